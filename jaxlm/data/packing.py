"""Row datasets: fixed-length training rows with document-aware masks, built on demand.

Packing concatenates documents (each ending in eos) and cuts the stream into rows of
seq_len + 1 tokens. Only the compact token stream and the document start offsets are kept;
the five per-row fields are computed (vectorised) when a batch is requested.

Every dataset says which fields a model reads and their shapes: `fields` maps a name to
(length, numpy dtype), each field being [rows, length] (objectives such as seq2seq give the
decoder fields another length than the encoder's).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")  # a causal LM row's

Fields = dict[str, tuple[int, np.dtype]]  # name -> (length, dtype) of a [rows, length] field


def field_specs(names, length: int) -> Fields:
    """`names` as [rows, length] fields: loss_mask float32, every other field int32."""
    return {k: (length, np.dtype(np.float32 if k == "loss_mask" else np.int32)) for k in names}


class RowDataset(Protocol):
    """What DataIterator needs; `get` returns at least the `fields`, each [len(row_ids),
    length]."""
    num_rows: int
    seq_len: int
    iid_rows: bool  # rows are already independent random draws: no shuffle needed
    fields: Fields  # what a model needs to read (see SyntheticDataset)

    def get(self, row_ids: np.ndarray) -> dict[str, np.ndarray]: ...


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator determined only by integer keys (negative seeds allowed)."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])


def check_rows(row_ids, num_rows: int) -> np.ndarray:
    rows_B = np.asarray(row_ids, dtype=np.int64).reshape(-1)
    if rows_B.size and (rows_B.min() < 0 or rows_B.max() >= num_rows):
        raise IndexError(f"row ids must be in [0, {num_rows}), got {rows_B.min()}..{rows_B.max()}")
    return rows_B


class PackedDataset:
    """Rows cut from one token stream; `doc_starts_D` are the stream offsets of each document."""

    iid_rows = False

    def __init__(self, tokens_N: np.ndarray, doc_starts_D: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens_N = tokens_N
        self.doc_starts_D = np.asarray(doc_starts_D, dtype=np.int64)
        self.seq_len = seq_len
        self.fields = field_specs(FIELDS, seq_len)
        self.num_rows = len(tokens_N) // (seq_len + 1)  # the remainder at the end is dropped

    def __len__(self) -> int:
        return self.num_rows

    def get(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows_B = check_rows(row_ids, self.num_rows)
        width = self.seq_len + 1
        row_start_B = rows_B * width
        where_BxW = row_start_B[:, None] + np.arange(width)  # stream offset of every token
        tokens_BxW = self.tokens_N[where_BxW].astype(np.int32)
        doc_BxW = np.searchsorted(self.doc_starts_D, where_BxW, side="right") - 1
        doc_BxT = doc_BxW[:, :-1]
        # A document begins at its start offset, or at the row start if it began earlier.
        seg_start_BxT = np.maximum(self.doc_starts_D[doc_BxT], row_start_B[:, None])
        return {
            "inputs": tokens_BxW[:, :-1],
            "targets": tokens_BxW[:, 1:],
            "segment_ids": (doc_BxT - doc_BxT[:, :1] + 1).astype(np.int32),
            "positions": (where_BxW[:, :-1] - seg_start_BxT).astype(np.int32),
            "loss_mask": (doc_BxW[:, 1:] == doc_BxT).astype(np.float32),
        }


def pack_documents(documents: Sequence[str | bytes], tokenizer, seq_len: int) -> PackedDataset:
    """Tokenize each document, append eos, and concatenate into one compact stream."""
    token_docs = tokenizer.encode_batch(documents) if len(documents) else []
    lengths_D = np.array([len(t) + 1 for t in token_docs], dtype=np.int64)
    doc_starts_D = np.concatenate([[0], np.cumsum(lengths_D)[:-1]]).astype(np.int64)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens_N = np.full(int(lengths_D.sum()), tokenizer.eos_id, dtype=dtype)
    for start, toks in zip(doc_starts_D, token_docs):
        tokens_N[start:start + len(toks)] = toks
    return PackedDataset(tokens_N, doc_starts_D, seq_len)


class SyntheticDataset:
    """Random tokens for benchmarks: row i is drawn from (seed, split, i), so any row can be
    produced on demand and the dataset is effectively unbounded. One document per row.

    Tokens are drawn from [3, vocab_size - reserved_top): ids 0-2 are pad, bos, eos, and an
    objective that takes its special ids (mask, sentinels) from the top of the vocab reserves
    them (0 keeps the causal LM rows as they always were)."""

    iid_rows = True

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, split: int = 0,
                 num_rows: int = 2**31 - 1, reserved_top: int = 0):
        if vocab_size - reserved_top <= 3:
            raise ValueError(f"synthetic data needs vocab_size > 3 + reserved_top (ids 0-2 are "
                             f"special), got vocab_size {vocab_size}, reserved_top "
                             f"{reserved_top}")
        self.vocab_size, self.seq_len, self.seed, self.split = vocab_size, seq_len, seed, split
        self.num_rows, self.reserved_top = num_rows, reserved_top
        # one document per row: its segment ids are all 1, and a model that is not given them
        # runs attention without segment masking (cheaper on some kernels: cuDNN needs a dense
        # mask)
        self.fields = field_specs([f for f in FIELDS if f != "segment_ids"], seq_len)

    def __len__(self) -> int:
        return self.num_rows

    def tokens(self, row_ids: np.ndarray) -> np.ndarray:
        """[B, seq_len + 1] raw tokens of the rows."""
        rows_B = check_rows(row_ids, self.num_rows)
        tokens_BxW = np.empty((len(rows_B), self.seq_len + 1), dtype=np.int32)
        top = self.vocab_size - self.reserved_top
        for b, i in enumerate(rows_B):
            rng = seeded_rng(self.seed, self.split, i)
            tokens_BxW[b] = rng.integers(3, top, self.seq_len + 1, dtype=np.int32)
        return tokens_BxW

    def get(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        tokens_BxW = self.tokens(row_ids)
        shape = (len(tokens_BxW), self.seq_len)
        return {
            "inputs": tokens_BxW[:, :-1],
            "targets": tokens_BxW[:, 1:],
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.float32),
        }
