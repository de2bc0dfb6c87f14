"""Data path: byte tokenizer, built-in stdlib corpus, packed rows, resumable iteration."""
from jaxlm.data.corpus import Corpus, load_stdlib_corpus, stdlib_root
from jaxlm.data.loader import DataBundle, DataIterator, build_datasets, eval_batches
from jaxlm.data.packing import FIELDS, PackedDataset, RowDataset, SyntheticDataset, pack_documents
from jaxlm.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer", "Corpus", "load_stdlib_corpus", "stdlib_root", "FIELDS", "RowDataset",
    "PackedDataset", "SyntheticDataset", "pack_documents", "DataBundle", "build_datasets",
    "DataIterator", "eval_batches",
]
