"""Weighted mixtures of row datasets, and the deterministic plan of which rows come next.

The stream position is a small JSON-able dict: `rows` drawn so far, and per source the `epoch`
and `index` into that epoch's seeded permutation. Which source global row r comes from is drawn
from (seed, r // BLOCK) alone, so the plan is a pure function of the position: the same on
every process, for any number of processes, and after any resume.
"""
from __future__ import annotations

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data.packing import Fields, RowDataset, seeded_rng

BLOCK = 4096  # source draws are made per block of global rows
MIX_TAG = 0x6D6978  # keeps the source draws apart from the per-source permutations


class Mixture:
    """Row datasets drawn by (normalised) weight; a single dataset is a mixture of one."""

    def __init__(self, datasets: list[RowDataset], weights=None, names=None):
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        lens = {d.seq_len for d in datasets}
        if len(lens) != 1:
            raise ValueError(f"mixture datasets have different seq_len: {sorted(lens)}")
        weights_S = np.ones(len(datasets)) if weights is None else np.asarray(weights, float)
        if weights_S.shape != (len(datasets),) or not (weights_S > 0).all():
            raise ValueError(f"mixture weights must be one positive number per dataset, "
                             f"got {weights}")
        self.datasets, self.weights_S = list(datasets), weights_S / weights_S.sum()
        self.names = list(names) if names else [f"source {i}" for i in range(len(datasets))]
        self.seq_len = lens.pop()
        empty = [n for n, d in zip(self.names, self.datasets) if d.num_rows < 1]
        if empty:
            raise ConfigError(f"{empty[0]} has no rows of seq_len + 1 tokens")

    @property
    def num_rows(self) -> int:
        return sum(d.num_rows for d in self.datasets)

    @property
    def fields(self) -> Fields:
        """The fields a model reads: those any source needs (segment ids if any source packs),
        each with the one (length, dtype) every source that has it agrees on."""
        out: Fields = {}
        for name, d in zip(self.names, self.datasets):
            for k, spec in d.fields.items():
                if out.setdefault(k, spec) != spec:
                    raise ValueError(f"{name}: field {k} is {spec}, another source's is "
                                     f"{out[k]}")
        return out

    def get(self, src_B: np.ndarray, rows_B: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows_B[i]` of sources `src_B[i]`, in that order."""
        if len(self.datasets) == 1:
            return self.datasets[0].get(rows_B)
        out = None
        for s in np.unique(src_B):
            pick_B = src_B == s
            part = self.datasets[s].get(rows_B[pick_B])
            if out is None:
                out = {k: np.empty((len(rows_B),) + v.shape[1:], v.dtype) for k, v in part.items()}
            for k, v in part.items():
                out[k][pick_B] = v
        return out


def as_mixture(dataset) -> Mixture:
    return dataset if isinstance(dataset, Mixture) else Mixture([dataset])


def initial_position(num_sources: int) -> dict:
    return {"rows": 0, "sources": [{"epoch": 0, "index": 0} for _ in range(num_sources)]}


def _int(value, what: str) -> int:
    arr = np.asarray(value)
    if isinstance(value, bool) or arr.ndim != 0 or arr.dtype.kind not in "iu" or int(arr) < 0:
        raise ConfigError(f"data iterator state: {what} must be an integer >= 0, got {value!r}")
    return int(arr)


def check_position(state, mixture: Mixture) -> dict:
    """A restored state, validated against the datasets (clear errors for a checkpoint made
    with other data); returns plain ints."""
    if not isinstance(state, dict) or set(state) != {"rows", "sources"}:
        raise ConfigError(f"data iterator state must be a dict with keys 'rows' and 'sources', "
                          f"got {state!r}")
    sources = state["sources"]
    if not isinstance(sources, (list, tuple)) or len(sources) != len(mixture.datasets):
        count = len(sources) if isinstance(sources, (list, tuple)) else "no list of"
        raise ConfigError(f"data iterator state has {count} sources, but the data config has "
                          f"{len(mixture.datasets)}; resume with the data config the checkpoint "
                          f"was written with")
    out = {"rows": _int(state["rows"], "rows"), "sources": []}
    for i, (src, ds) in enumerate(zip(sources, mixture.datasets)):
        if not isinstance(src, dict) or set(src) != {"epoch", "index"}:
            raise ConfigError(f"data iterator state: sources[{i}] must be a dict with keys "
                              f"'epoch' and 'index', got {src!r}")
        epoch, index = _int(src["epoch"], f"sources[{i}].epoch"), _int(src["index"],
                                                                       f"sources[{i}].index")
        if index > ds.num_rows:
            raise ConfigError(f"data iterator state {state!r} is out of range for "
                              f"{mixture.names[i]} ({ds.num_rows} rows)")
        out["sources"].append({"epoch": epoch, "index": index})
    return out


class Planner:
    """(source, row) of each of the next global rows after a position: each source walks a
    seeded per-epoch permutation of its rows; epochs run on without dropping rows."""

    def __init__(self, mixture: Mixture, seed: int, shuffle: bool = True):
        self.mixture, self.seed = mixture, seed
        # Independent random rows (synthetic) need no permutation, which could not be built.
        self.shuffle = [shuffle and not getattr(d, "iid_rows", False) for d in mixture.datasets]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _sources(self, start: int, count: int) -> np.ndarray:
        if len(self.mixture.datasets) == 1:
            return np.zeros(count, np.int64)
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        draws = [seeded_rng(self.seed, MIX_TAG, b).choice(
            len(self.mixture.datasets), BLOCK, p=self.mixture.weights_S)
            for b in range(first, last + 1)]
        return np.concatenate(draws)[start - first * BLOCK:][:count]

    def _order(self, s: int, epoch: int, lo: int, hi: int) -> np.ndarray:
        if not self.shuffle[s]:
            return np.arange(lo, hi, dtype=np.int64)
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            n = self.mixture.datasets[s].num_rows
            cached = (epoch, seeded_rng(self.seed, s, epoch).permutation(n))
            self._perms[s] = cached
        return cached[1][lo:hi]

    def _take(self, s: int, pos: dict, k: int) -> np.ndarray:
        n = self.mixture.datasets[s].num_rows
        parts = []
        while k > 0:
            if pos["index"] >= n:
                pos["epoch"], pos["index"] = pos["epoch"] + 1, 0
            m = min(k, n - pos["index"])
            parts.append(self._order(s, pos["epoch"], pos["index"], pos["index"] + m))
            pos["index"] += m
            k -= m
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def plan(self, position: dict, count: int):
        """(src_G, rows_G, position after) for the next `count` global rows."""
        new = {"rows": position["rows"] + count,
               "sources": [dict(p) for p in position["sources"]]}
        src_G = self._sources(position["rows"], count)
        rows_G = np.empty(count, np.int64)
        for s in range(len(self.mixture.datasets)):
            pick_G = src_G == s
            rows_G[pick_G] = self._take(s, new["sources"][s], int(pick_G.sum()))
        return src_G, rows_G, new
