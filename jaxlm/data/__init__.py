"""Data: sources (stdlib, synthetic, local files, tfds, token files, mixtures) -> tokenizer ->
token cache -> packed rows -> the model objective's rows (causal LM as packed, masked LM, span
corruption) -> deterministic, resumable, per-process batches.

Importing this package imports neither JAX nor tfds nor a tokenizer library; each is loaded when
a config needs it.
"""
from jaxlm.data.corpus import Corpus, load_stdlib_corpus, stdlib_root
from jaxlm.data.loader import (DataBundle, DataIterator, build_datasets, eval_batches,
                               synthetic_dataset)
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import (FIELDS, Fields, PackedDataset, RowDataset, SyntheticDataset,
                                field_specs, pack_documents)
from jaxlm.data.transforms import DATA_OBJECTIVES
from jaxlm.data.tokenizer import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                                  load_tokenizer)

__all__ = [
    "ByteTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "load_tokenizer", "Corpus",
    "load_stdlib_corpus", "stdlib_root", "FIELDS", "Fields", "field_specs", "RowDataset",
    "PackedDataset", "SyntheticDataset", "pack_documents", "Mixture", "DataBundle",
    "build_datasets", "synthetic_dataset", "DATA_OBJECTIVES", "DataIterator", "eval_batches",
]
