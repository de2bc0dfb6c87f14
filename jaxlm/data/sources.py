"""One configured source -> (train, eval) row datasets and a fingerprint.

stdlib and synthetic need no files. `files` and `tfds` are tokenized once into the token cache
(files first become a tfds dataset of their own); `tokens` memory-maps a pre-tokenized array.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import cache, files, tfds_source
from jaxlm.data.corpus import load_stdlib_corpus
from jaxlm.data.packing import PackedDataset, SyntheticDataset, pack_documents

SCAN_CHUNK = 1 << 26  # tokens per pass when scanning a token file


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_source(cfg: DataConfig, tokenizer, vocab_size: int, reserved_top: int = 0):
    """(train, eval, fingerprint) for one non-mixture source; synthetic rows draw no token from
    the top `reserved_top` ids (special ids an objective took from there)."""
    if cfg.source == "synthetic":
        if vocab_size <= 3:
            raise ConfigError(f"model.vocab_size={vocab_size} is too small for synthetic data "
                              f"(ids 0-2 are special; need at least 4)")
        reserved = f" reserved_top={reserved_top}" if reserved_top else ""
        return (SyntheticDataset(vocab_size, cfg.seq_len, cfg.seed, 0, reserved_top=reserved_top),
                SyntheticDataset(vocab_size, cfg.seq_len, cfg.seed, 1, reserved_top=reserved_top),
                _sha(f"synthetic seed={cfg.seed} vocab={vocab_size} seq_len={cfg.seq_len}"
                     f"{reserved}"))
    if cfg.source == "stdlib":
        corpus = load_stdlib_corpus(cfg.max_bytes, cfg.eval_fraction)
        fp = corpus.fingerprint if tokenizer.name == "byte" else _sha(
            f"{corpus.fingerprint} {tokenizer.fingerprint}")
        return (pack_documents(corpus.train, tokenizer, cfg.seq_len),
                pack_documents(corpus.eval, tokenizer, cfg.seq_len), fp)
    if cfg.source == "tokens":
        return _token_file(cfg, tokenizer, vocab_size)
    if cfg.source == "files":
        entry, fp = _files(cfg, tokenizer)
    elif cfg.source == "tfds":
        entry, fp = _tfds(cfg, tokenizer)
    else:
        raise ConfigError(f"data.source: {cfg.source!r} cannot be built as a single source")
    return (PackedDataset(*entry["train"], cfg.seq_len), PackedDataset(*entry["eval"], cfg.seq_len),
            fp)


def _cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def _files(cfg: DataConfig, tokenizer):
    found = files.list_files(cfg.path)
    corpus_fp = files.fingerprint(found, cfg.text_field)
    key = cache.cache_key(corpus=corpus_fp, tokenizer=tokenizer.fingerprint,
                          eval_fraction=cfg.eval_fraction)
    folder = _cache_dir(cfg) / "tokens" / key
    entry = cache.load(folder)  # a hit needs neither tfds nor the text
    if entry is None:
        builder = tfds_source.local_corpus(found, cfg.text_field, _cache_dir(cfg))
        docs = tfds_source.iter_documents(builder, f"data.path={cfg.path}", "train", "text",
                                          key_field="key")
        entry = cache.build(folder, docs, tokenizer, cfg.eval_fraction,
                            label=f"data.path={cfg.path}")
    return entry, key


def _tfds(cfg: DataConfig, tokenizer):
    name = cfg.tfds_name
    builder = tfds_source.open_builder(name, cfg.tfds_data_dir)
    fp = tfds_source.fingerprint(builder, [cfg.tfds_split, str(cfg.tfds_eval_split),
                                           cfg.text_field])
    key = cache.cache_key(corpus=fp, tokenizer=tokenizer.fingerprint,
                          eval_fraction=None if cfg.tfds_eval_split else cfg.eval_fraction)
    folder = _cache_dir(cfg) / "tokens" / key
    entry = cache.load(folder)
    if entry is None:
        docs = tfds_source.iter_documents(builder, name, cfg.tfds_split, cfg.text_field)
        evals = (tfds_source.iter_documents(builder, name, cfg.tfds_eval_split, cfg.text_field)
                 if cfg.tfds_eval_split else None)
        entry = cache.build(folder, docs, tokenizer, cfg.eval_fraction, evals,
                            label=f"tfds {name} {cfg.tfds_split}")
    return entry, key


def _token_file(cfg: DataConfig, tokenizer, vocab_size: int):
    """A flat array of token ids; documents end at the tokenizer's eos. Eval is the tail
    eval_fraction of the tokens, cut at a document start where there is one."""
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path: {cfg.path}: token file not found")
    try:
        if path.suffix == ".npy":
            tokens_N = np.load(path, mmap_mode="r")
        else:
            dtype = np.dtype(cfg.token_dtype)
            size = path.stat().st_size
            if size % dtype.itemsize:
                raise ValueError(f"its {size} bytes are not a whole number of {dtype.name} "
                                 f"tokens (data.token_dtype)")
            tokens_N = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    except ValueError as e:
        raise ConfigError(f"{path}: not a token file ({str(e).splitlines()[0]})") from None
    if tokens_N.ndim != 1 or tokens_N.dtype.kind not in "iu" or len(tokens_N) == 0:
        raise ConfigError(f"{path}: expected a non-empty 1-D integer array of token ids, got "
                          f"{tokens_N.dtype} {tokens_N.shape}")
    ends, top, low = [], 0, 0
    for start in range(0, len(tokens_N), SCAN_CHUNK):
        chunk = np.asarray(tokens_N[start:start + SCAN_CHUNK])
        top, low = max(top, int(chunk.max())), min(low, int(chunk.min()))
        ends.append(np.flatnonzero(chunk == tokenizer.eos_id) + start + 1)
    if low < 0 or top >= vocab_size:
        bad = low if low < 0 else top
        raise ConfigError(f"{path}: token id {bad} is outside [0, model.vocab_size={vocab_size})")
    n = len(tokens_N)
    starts_D = np.concatenate([[0]] + ends).astype(np.int64)
    starts_D = starts_D[starts_D < n]
    target = n - max(1, int(n * cfg.eval_fraction))
    later = starts_D[starts_D >= target]
    cut = int(later[0]) if len(later) else target
    train_starts = starts_D[starts_D < cut]
    eval_starts = np.union1d([cut], starts_D[starts_D >= cut]) - cut
    st = path.stat()
    fp = _sha(f"{path.absolute()} {st.st_size} {st.st_mtime_ns} {cfg.token_dtype} "
              f"{tokenizer.eos_id} {cfg.eval_fraction}")
    return (PackedDataset(tokens_N[:cut], train_starts, cfg.seq_len),
            PackedDataset(tokens_N[cut:], eval_starts, cfg.seq_len), fp)
