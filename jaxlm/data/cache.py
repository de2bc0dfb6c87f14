"""Tokenized corpora on disk: tokenize once, memory-map every later run.

A cache entry is a folder named by a key over (corpus fingerprint, tokenizer fingerprint, split
settings). It holds the train and eval token streams (flat uint16/uint32, each document followed
by eos) and their document start offsets. The folder is written under a temporary name and
renamed when complete, so a crash never leaves a half-written entry that a later run would read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxlm.config import ConfigError

FORMAT = 1
CHUNK_BYTES = 4 << 20  # text tokenized per encode_batch call
SPLITS = ("train", "eval")


def cache_key(**parts) -> str:
    parts["format"] = FORMAT
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """Split by a stable hash of the document key, never by position or corpus size."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < eval_fraction * 10_000


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class _Stream:
    """One split being written: tokens appended to a raw file, document lengths kept."""

    def __init__(self, path: Path, dtype):
        self.file, self.dtype, self.lengths = open(path, "wb"), dtype, []

    def add(self, tokens_N: np.ndarray, eos_id: int):
        self.file.write(np.append(tokens_N, eos_id).astype(self.dtype).tobytes())
        self.lengths.append(len(tokens_N) + 1)


def build(folder: Path, documents: Iterable[tuple[str, str | bytes]], tokenizer,
          eval_fraction: float, eval_documents: Iterable | None = None, label: str = "") -> dict:
    """Tokenize `documents` (key, text) into `folder`, split by key hash, or, when
    `eval_documents` is given, train = documents and eval = eval_documents. Returns the
    loaded entry. If nothing lands in eval, the last train document moves there."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    print(f"jaxlm.data: tokenizing {label} into {folder} (once; later runs reuse it)",
          file=sys.stderr, flush=True)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        streams = {s: _Stream(tmp / f"{s}.tokens", dtype) for s in SPLITS}
        held = _tokenize_into(streams, documents, tokenizer, eval_fraction,
                              force_split="train" if eval_documents is not None else None)
        if eval_documents is not None:
            _tokenize_into(streams, eval_documents, tokenizer, 0.0, force_split="eval")
        if held is not None:  # the last train document: to eval if eval would be empty
            streams["eval" if not streams["eval"].lengths else "train"].add(held,
                                                                           tokenizer.eos_id)
        if not streams["train"].lengths and not streams["eval"].lengths:
            raise ConfigError(f"{label}: no documents")
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "label": label,
                "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}
        for s, stream in streams.items():
            stream.file.close()
            starts_D = np.concatenate([[0], np.cumsum(stream.lengths[:-1])]).astype(np.int64)
            np.save(tmp / f"{s}.docs.npy", starts_D[:len(stream.lengths)])
            meta[s] = {"tokens": int(sum(stream.lengths)), "documents": len(stream.lengths)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same entry first: use its copy
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = load(folder)
    n = entry["meta"]["train"]["tokens"] + entry["meta"]["eval"]["tokens"]
    dt = time.perf_counter() - t0
    print(f"jaxlm.data: {n:,} tokens in {dt:.1f} s ({n / max(dt, 1e-9):,.0f} tokens/s)",
          file=sys.stderr, flush=True)
    return entry


def _tokenize_into(streams, documents, tokenizer, eval_fraction, force_split=None):
    """Append documents in order; returns the last train document, not yet written."""
    held, keys, texts, size = None, [], [], 0

    def flush():
        nonlocal held
        for key, tokens_N in zip(keys, tokenizer.encode_batch(texts)):
            split = force_split or ("eval" if is_eval_key(key, eval_fraction) else "train")
            if split == "train" and force_split is None:
                if held is not None:
                    streams["train"].add(held, tokenizer.eos_id)
                held = tokens_N
            else:
                streams[split].add(tokens_N, tokenizer.eos_id)
        keys.clear(), texts.clear()

    for key, text in documents:
        keys.append(key)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            flush()
            size = 0
    flush()
    return held


def load(folder: Path) -> dict | None:
    """{"meta", "train": (tokens_N, doc_starts_D), "eval": ...} memory-mapped, or None if the
    entry does not exist. A damaged entry is an error naming the file to delete."""
    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        out = {"meta": meta}
        for s in SPLITS:
            n, d = meta[s]["tokens"], meta[s]["documents"]
            path = folder / f"{s}.tokens"
            dtype = np.dtype(meta["dtype"])
            if path.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{path} has {path.stat().st_size} bytes, expected "
                                 f"{n * dtype.itemsize}")
            tokens_N = (np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype))
            starts_D = np.load(folder / f"{s}.docs.npy")
            if starts_D.shape != (d,):
                raise ValueError(f"{s}.docs.npy has shape {starts_D.shape}, expected ({d},)")
            out[s] = (tokens_N, starts_D)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"token cache {folder} is damaged ({e}); delete that folder and run "
                          f"again to rebuild it") from None
    return out
