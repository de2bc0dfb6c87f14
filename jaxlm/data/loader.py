"""Config -> datasets, and deterministic, resumable batch iteration split across processes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.corpus import load_stdlib_corpus
from jaxlm.data.packing import RowDataset, SyntheticDataset, pack_documents, seeded_rng
from jaxlm.data.tokenizer import ByteTokenizer


@dataclass
class DataBundle:
    train: RowDataset
    eval: RowDataset
    tokenizer: ByteTokenizer | None  # None for synthetic data
    fingerprint: str  # a resumed run compares this to detect a changed corpus


def build_datasets(cfg: DataConfig, vocab_size: int) -> DataBundle:
    """Train/eval datasets for `cfg.source`; the model's vocab must cover the tokens."""
    if cfg.source == "synthetic":
        if vocab_size <= 3:
            raise ConfigError(f"model.vocab_size={vocab_size} is too small for synthetic data "
                              f"(ids 0-2 are special; need at least 4)")
        key = f"synthetic seed={cfg.seed} vocab={vocab_size} seq_len={cfg.seq_len}"
        return DataBundle(train=SyntheticDataset(vocab_size, cfg.seq_len, cfg.seed, split=0),
                          eval=SyntheticDataset(vocab_size, cfg.seq_len, cfg.seed, split=1),
                          tokenizer=None,
                          fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    if cfg.source != "stdlib":
        raise ConfigError(f"data.source: {cfg.source!r} is not one of: stdlib, synthetic")
    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the byte tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    corpus = load_stdlib_corpus(cfg.max_bytes, cfg.eval_fraction)
    train = pack_documents(corpus.train, tokenizer, cfg.seq_len)
    evals = pack_documents(corpus.eval, tokenizer, cfg.seq_len)
    sizes = f"data.max_bytes={cfg.max_bytes}, data.seq_len={cfg.seq_len}"
    if train.num_rows < 1:
        raise ConfigError(f"the train split has no full row of data.seq_len+1 tokens ({sizes}); "
                          f"raise data.max_bytes or lower data.seq_len")
    if evals.num_rows < 1:
        raise ConfigError(f"the eval split has no full row of data.seq_len+1 tokens ({sizes}); "
                          f"raise data.max_bytes, data.eval_fraction or lower data.seq_len")
    return DataBundle(train=train, eval=evals, tokenizer=tokenizer, fingerprint=corpus.fingerprint)


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


class DataIterator:
    """Batches of rows in a per-epoch shuffled order, resumable from a tiny state dict.

    `index` counts the global rows consumed in the current epoch; an epoch's leftover rows
    (fewer than one global batch) are dropped. Each process gets a contiguous slice of every
    global batch, so all processes walk the same global order.
    """

    def __init__(self, dataset: RowDataset, global_batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        self._local = _local_slice(global_batch_size, process_index, process_count)
        if dataset.num_rows < global_batch_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is larger than the "
                              f"dataset's {dataset.num_rows} rows; lower it or add data "
                              f"(data.max_bytes)")
        self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
        # Independent random rows (synthetic) need no permutation, which could not be built.
        self.shuffle = shuffle and not getattr(dataset, "iid_rows", False)
        self._epoch, self._index = 0, 0
        self._perm_epoch, self._perm = None, None

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        if self._perm_epoch != self._epoch:
            self._perm = seeded_rng(self.seed, self._epoch).permutation(self.dataset.num_rows)
            self._perm_epoch = self._epoch
        return self._perm[start:stop]

    def next(self) -> dict[str, np.ndarray]:
        """This process's share of the next global batch; advances the state."""
        if self._index + self.global_batch_size > self.dataset.num_rows:
            self._epoch, self._index = self._epoch + 1, 0
        rows_G = self._rows(self._index, self._index + self.global_batch_size)
        self._index += self.global_batch_size
        return self.dataset.get(rows_G[self._local])

    __next__ = next

    def __iter__(self):
        return self

    def state(self) -> dict[str, int]:
        """Position after the batches already returned; pass to `restore` to resume."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "index"}:
            raise ValueError(f"data iterator state must be a dict with keys 'epoch' and "
                             f"'index', got {state!r}")
        values = {}
        for key, value in state.items():
            arr = np.asarray(value)
            if arr.ndim != 0 or arr.dtype.kind not in "iu" or isinstance(value, bool):
                raise ValueError(f"data iterator state[{key!r}] must be an integer, got {value!r}")
            values[key] = int(arr)
        if values["epoch"] < 0 or not 0 <= values["index"] <= self.dataset.num_rows:
            raise ValueError(f"data iterator state {state!r} is out of range for a dataset of "
                             f"{self.dataset.num_rows} rows")
        self._epoch, self._index = values["epoch"], values["index"]


def eval_batches(dataset: RowDataset, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches in row order (wrapping around a small set):
    the same rows every time, so eval loss is comparable across steps and runs."""
    local = _local_slice(global_batch_size, process_index, process_count)
    if dataset.num_rows < 1:
        raise ConfigError("the eval dataset has no rows")
    rows_NxG = (np.arange(num_batches * global_batch_size, dtype=np.int64)
                % dataset.num_rows).reshape(num_batches, global_batch_size)
    return [dataset.get(rows_G[local]) for rows_G in rows_NxG]
