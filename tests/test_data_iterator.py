"""Iteration: exact resume of the token stream (also with another number of processes and with
read-ahead), per-process slices covering each global batch exactly once, weighted mixtures."""
import json
import time

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import (FIELDS, ByteTokenizer, DataIterator, Mixture, build_datasets,
                        eval_batches, pack_documents)


class RowIdDataset:
    """Rows whose only content is an id (offset per source): makes the order visible."""
    iid_rows = False
    seq_len = 1

    def __init__(self, num_rows, offset=0):
        self.num_rows, self.offset = num_rows, offset

    def get(self, row_ids):
        return {"inputs": np.asarray(row_ids)[:, None] + self.offset}


def _ids(batch):
    return batch["inputs"][:, 0].tolist()


@pytest.fixture(scope="module")
def packed():
    rng = np.random.default_rng(3)
    docs = [bytes(rng.integers(32, 127, rng.integers(1, 50)).astype(np.uint8))
            for _ in range(600)]
    return pack_documents(docs, ByteTokenizer(), seq_len=16)


def _run(dataset, batches, seed=7, procs=1, state=None, prefetch=0, batch=8):
    """`batches` global batches read by `procs` simulated processes, concatenated per batch;
    returns them with the final state (all processes agree on it)."""
    its = [DataIterator(dataset, batch, seed, process_index=p, process_count=procs,
                        prefetch=prefetch) for p in range(procs)]
    for it in its:
        if state is not None:
            it.restore(json.loads(json.dumps(state)))  # as a checkpoint stores it
    out = []
    for _ in range(batches):
        parts = [it.next() for it in its]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    states = [it.state() for it in its]
    assert all(s == states[0] for s in states)
    for it in its:
        it.close()
    return out, states[0]


def _same(a, b):
    return len(a) == len(b) and all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("procs_before,procs_after", [(2, 1), (1, 4), (4, 2)])
def test_resume_exact_across_process_counts(packed, procs_before, procs_after):
    total, k = 140, 53  # > 1 epoch of the 146 rows' 18 batches: crosses epoch boundaries
    reference, _ = _run(packed, total)
    first, state = _run(packed, k, procs=procs_before)
    rest, _ = _run(packed, total - k, procs=procs_after, state=state)
    assert _same(first + rest, reference)
    assert state["rows"] == k * 8 and set(state) == {"rows", "sources"}
    # The token stream itself: every row is a real packed row, fields consistent.
    assert all(set(b) == set(FIELDS) and b["inputs"].shape == (8, 16) for b in reference)


def test_processes_cover_global_batch_exactly_once():
    ds = RowIdDataset(40)
    for procs in (2, 4):
        batches, _ = _run(ds, 15, procs=procs)
        for b in batches:
            assert len(set(_ids(b))) == 8  # disjoint slices, nothing twice in a batch
        single, _ = _run(ds, 15)
        assert [_ids(b) for b in batches] == [_ids(b) for b in single]
    # Each process really reads only its slice (asks the dataset for 4 of the 8 rows).
    seen = []

    class Spy(RowIdDataset):
        def get(self, row_ids):
            seen.append(len(row_ids))
            return super().get(row_ids)

    DataIterator(Spy(40), 8, seed=0, process_index=1, process_count=2).next()
    assert seen == [4]


def test_prefetch_same_stream_and_state(packed):
    plain, plain_state = _run(packed, 30)
    ahead, ahead_state = _run(packed, 30, prefetch=3)
    assert _same(plain, ahead) and plain_state == ahead_state
    # state() is the position after the batches returned, not after those read ahead.
    it = DataIterator(packed, 8, seed=7, prefetch=4)
    it.next(), it.next()
    time.sleep(0.05)  # let the thread run ahead
    assert it.state()["rows"] == 16
    saved = it.state()
    rest = [it.next() for _ in range(5)]
    it.restore(saved)  # a restore mid-stream restarts the read-ahead from there
    assert _same([it.next() for _ in range(5)], rest)
    it.close()


def test_prefetch_error_reaches_caller():
    class Broken(RowIdDataset):
        def get(self, row_ids):
            if (np.asarray(row_ids) >= 30).any():
                raise ValueError("disk on fire")
            return super().get(row_ids)

    it = DataIterator(Broken(40), 8, seed=0, shuffle=False, prefetch=2)
    assert [_ids(it.next()) for _ in range(3)][-1] == list(range(16, 24))
    with pytest.raises(ValueError, match="disk on fire"):
        it.next()
    it.close()


def test_mixture_weights_resume_and_state():
    a, b = RowIdDataset(50), RowIdDataset(30, offset=1000)
    mix = Mixture([a, b], [3.0, 1.0])
    batches, state = _run(mix, 400)
    ids = np.array(sum((_ids(x) for x in batches), []))
    from_b = (ids >= 1000).mean()
    assert abs(from_b - 0.25) < 0.03  # 3200 draws: 5 sigma is ~0.04
    # Each source is walked in whole seeded epochs: its first epoch is a permutation.
    first_a = [i for i in ids if i < 1000][:50]
    assert sorted(first_a) == list(range(50)) and first_a != list(range(50))
    # The state covers every source and sums to the rows drawn.
    srcs = state["sources"]
    assert len(srcs) == 2 and state["rows"] == 3200
    assert sum(s["epoch"] * n + s["index"] for s, n in zip(srcs, (50, 30))) == 3200
    for k in (1, 77, 399):
        head, mid = _run(mix, k, procs=2)
        tail, _ = _run(mix, 400 - k, state=mid, procs=4, prefetch=2)
        assert [_ids(x) for x in head + tail] == [_ids(x) for x in batches], k
    with pytest.raises(ConfigError, match="state has 1 sources, but the data config has 2"):
        DataIterator(mix, 8, seed=0).restore({"rows": 0, "sources": [{"epoch": 0, "index": 0}]})


def test_mixture_from_config(tmp_path):
    rng = np.random.default_rng(0)
    for name, top in (("low", 100), ("high", 300)):
        docs = [np.append(rng.integers(top - 90, top, 20), 2) for _ in range(300)]
        np.concatenate(docs).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
    cfg = DataConfig(source="mixture", seq_len=8, eval_fraction=0.2, mixture=[
        {"source": "tokens", "path": str(tmp_path / "low.bin"), "weight": 1.0},
        {"source": "tokens", "path": str(tmp_path / "high.bin"), "weight": 3.0},
        {"source": "synthetic", "weight": 1.0}])
    bundle = build_datasets(cfg, vocab_size=400)
    assert isinstance(bundle.train, Mixture) and len(bundle.train.datasets) == 3
    batch = DataIterator(bundle.train, 500, seed=1).next()
    x = batch["inputs"]
    in_range = lambda lo, hi: (((x >= lo) & (x < hi)) | (x == 2)).all(axis=1)  # noqa: E731
    low, high = in_range(10, 100).mean(), in_range(210, 300).mean()
    assert abs(low - 0.2) < 0.07 and abs(high - 0.6) < 0.09 and low + high < 0.9
    evals = eval_batches(bundle.eval, 8, 3)
    again = eval_batches(build_datasets(cfg, 400).eval, 8, 3)
    assert _same(evals, again) and evals[0]["inputs"].shape == (8, 8)
    changed = DataConfig(**{**cfg.__dict__, "mixture": cfg.mixture[:2]})
    assert build_datasets(changed, 400).fingerprint != bundle.fingerprint
