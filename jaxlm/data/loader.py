"""Config -> datasets, and deterministic, resumable batch iteration split across processes."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.mixture import Mixture, Planner, as_mixture, check_position, initial_position
from jaxlm.data.packing import Fields, RowDataset
from jaxlm.data.prefetch import Prefetcher
from jaxlm.data.sources import build_source
from jaxlm.data.special_ids import SpecialIds
from jaxlm.data.tokenizer import check_vocab, load_tokenizer
from jaxlm.data.transforms import objective_transform


@dataclass
class DataBundle:
    train: RowDataset | Mixture
    eval: RowDataset | Mixture
    tokenizer: object | None  # None when every source is synthetic
    fingerprint: str  # a resumed run compares this to detect a changed corpus
    special_ids: SpecialIds | None = None  # the objective's mask/sentinel/pad ids (not causal)

    @property
    def fields(self) -> Fields:
        """The batch fields a model reads, name -> (length, dtype), each [rows, length]
        (segment_ids only where rows can hold several documents)."""
        return self.train.fields


def build_datasets(cfg: DataConfig, vocab_size: int, objective: str = "causal_lm") -> DataBundle:
    """Train/eval datasets for `cfg.source` (a mixture: one per entry, drawn by weight), as the
    model `objective` reads them (transforms.DATA_OBJECTIVES: tests build any of them); the
    model's vocab must cover the tokenizer's and every special id the objective emits."""
    sources = cfg.sources()
    tokenizer = None
    if any(src.source != "synthetic" for src, _ in sources):
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
        check_vocab(tokenizer, vocab_size)
    transform = objective_transform(cfg, objective, tokenizer, vocab_size)
    trains, evals, prints, names = [], [], [], []
    for i, (src, weight) in enumerate(sources):
        name = f"data.mixture[{i}] ({src.source})" if cfg.source == "mixture" else \
            f"data.source={src.source}"
        train, held_out, fp = build_source(src, tokenizer, vocab_size, transform.reserved_top)
        sizes = (f"data.max_bytes={src.max_bytes}, " if src.source == "stdlib" else "") + \
            f"data.seq_len={src.seq_len}"
        if train.num_rows < 1:
            raise ConfigError(f"{name}: the train split has no full row of data.seq_len+1 tokens "
                              f"({sizes}); add data or lower data.seq_len")
        if held_out.num_rows < 1:
            raise ConfigError(f"{name}: the eval split has no full row of data.seq_len+1 tokens "
                              f"({sizes}); raise data.eval_fraction, add data or lower "
                              f"data.seq_len")
        train, held_out = transform.apply(train, 0, i), transform.apply(held_out, 1, i)
        for split, ds in (("train", train), ("eval", held_out)):
            if ds.num_rows < 1:
                raise ConfigError(f"{name}: the {split} split has no {objective} example "
                                  f"({sizes}); add data")
        trains.append(train), evals.append(held_out), names.append(name)
        prints.append(f"{fp}:{weight!r}")
    fingerprint = (prints[0].split(":")[0] if len(sources) == 1 else
                   hashlib.sha256(" ".join(prints).encode()).hexdigest()[:16])
    fingerprint = transform.fingerprint(fingerprint)
    if len(sources) == 1:
        return DataBundle(trains[0], evals[0], tokenizer, fingerprint, transform.special_ids)
    weights = [w for _, w in sources]
    return DataBundle(Mixture(trains, weights, names), Mixture(evals, weights, names), tokenizer,
                      fingerprint, transform.special_ids)


def synthetic_dataset(cfg: DataConfig, vocab_size: int, objective: str = "causal_lm"):
    """The train rows of `cfg` with data.source=synthetic at seed 0: what benchmarks time the
    step on (device-resident batches of the objective's fields)."""
    synthetic = dataclasses.replace(cfg, source="synthetic", seed=0, mixture=[])
    return build_datasets(synthetic, vocab_size, objective).train


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


class DataIterator:
    """Batches of rows in a seeded per-epoch shuffled order, resumable from a tiny state dict.

    Every process plans the same global batch and reads only its contiguous slice of it, so
    the global order does not depend on the number of processes, and a state saved with N
    processes resumes exactly with M. With `prefetch` > 0 batches are read ahead on a thread;
    `state()` is still the position after the batches already returned.
    """

    def __init__(self, dataset: RowDataset | Mixture, global_batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 0, local_rows: slice | None = None):
        # local_rows (the rows this process's devices hold, from the batch sharding) overrides
        # the contiguous per-process split
        self._local = local_rows or _local_slice(global_batch_size, process_index, process_count)
        self.mixture = as_mixture(dataset)
        if self.mixture.num_rows < global_batch_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is larger than the "
                              f"dataset's {self.mixture.num_rows} rows; lower it or add data "
                              f"(data.max_bytes)")
        self.global_batch_size = global_batch_size
        self._planner = Planner(self.mixture, seed, shuffle)
        self._position = initial_position(len(self.mixture.datasets))
        self._ahead = Prefetcher(self._read, prefetch) if prefetch else None

    def _read(self, position):
        src_G, rows_G, after = self._planner.plan(position, self.global_batch_size)
        return self.mixture.get(src_G[self._local], rows_G[self._local]), after

    def next(self) -> dict[str, np.ndarray]:
        """This process's share of the next global batch; advances the state."""
        reader = self._ahead.next if self._ahead else self._read
        batch, self._position = reader(self._position)
        return batch

    __next__ = next

    def __iter__(self):
        return self

    def state(self) -> dict:
        """Position after the batches already returned; pass to `restore` to resume."""
        return {"rows": self._position["rows"],
                "sources": [dict(p) for p in self._position["sources"]]}

    def restore(self, state: dict) -> None:
        self._position = check_position(state, self.mixture)

    def close(self) -> None:
        if self._ahead:
            self._ahead.close()


def eval_batches(dataset: RowDataset | Mixture, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1,
                 local_rows: slice | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches in row order (wrapping around a small set; a
    mixture draws sources by weight): the same rows every time, so eval loss is comparable
    across steps and runs."""
    local = local_rows or _local_slice(global_batch_size, process_index, process_count)
    mixture = as_mixture(dataset)
    src_NG, rows_NG, _ = Planner(mixture, seed=0, shuffle=False).plan(
        initial_position(len(mixture.datasets)), num_batches * global_batch_size)
    src_NxG = src_NG.reshape(num_batches, global_batch_size)
    rows_NxG = rows_NG.reshape(num_batches, global_batch_size)
    return [mixture.get(s_G[local], r_G[local]) for s_G, r_G in zip(src_NxG, rows_NxG)]
