"""Data path: tokenizer, packing invariants, stdlib corpus, resumable iteration."""
import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import (FIELDS, ByteTokenizer, DataIterator,
                        build_datasets, eval_batches, load_stdlib_corpus, pack_documents)

TOK = ByteTokenizer()


def test_tokenizer_round_trip_and_ids():
    text = "héllo wörld — 日本語 🐍\n"
    ids = TOK.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert ids.min() >= 3 and ids.max() < TOK.vocab_size == 259
    assert TOK.decode(ids) == text
    assert TOK.encode(b"\x00\xff").tolist() == [3, 258]
    specials = np.concatenate([[TOK.bos_id], ids, [TOK.eos_id, TOK.pad_id, 300]])
    assert TOK.decode(specials) == text  # special and out-of-range ids are dropped


def test_packing_hand_computed():
    ds = pack_documents([b"ab", "cde", b"f", b"gh"], TOK, seq_len=4)
    # stream: a b E c d | e E f E g | h E (remainder dropped)
    assert ds.num_rows == 2
    out = ds.get(np.array([0, 1]))
    a, E = ord("a") + 3, TOK.eos_id
    assert out["inputs"].tolist() == [[a, a + 1, E, a + 2], [a + 4, E, a + 5, E]]
    assert out["targets"].tolist() == [[a + 1, E, a + 2, a + 3], [E, a + 5, E, a + 6]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 2, 2]]
    assert out["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert out["loss_mask"].tolist() == [[1, 1, 0, 1], [1, 0, 1, 0]]
    dtypes = {k: v.dtype for k, v in out.items()}
    assert dtypes == {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                      "positions": np.int32, "loss_mask": np.float32}


def _reference_rows(docs, seq_len):
    """Slow per-token reference for the packing rules."""
    stream, doc_of = [], []
    for d, doc in enumerate(docs):
        toks = list(TOK.encode(doc)) + [TOK.eos_id]
        stream += toks
        doc_of += [d] * len(toks)
    w = seq_len + 1
    rows = []
    for r in range(len(stream) // w):
        toks, docs_r = stream[r * w:(r + 1) * w], doc_of[r * w:(r + 1) * w]
        seg, pos = [], []
        for j in range(seq_len):
            new = j > 0 and docs_r[j] != docs_r[j - 1]
            seg.append(1 if j == 0 else seg[-1] + new)
            pos.append(0 if j == 0 or new else pos[-1] + 1)
        mask = [float(docs_r[j] == docs_r[j + 1]) for j in range(seq_len)]
        rows.append(dict(inputs=toks[:-1], targets=toks[1:], segment_ids=seg, positions=pos,
                         loss_mask=mask))
    return stream, rows


@pytest.mark.parametrize("seq_len", [1, 3, 7, 16])
def test_packing_invariants_random_docs(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [bytes(rng.integers(0, 256, rng.integers(0, 12)).astype(np.uint8)) for _ in range(40)]
    stream, ref = _reference_rows(docs, seq_len)
    ds = pack_documents(docs, TOK, seq_len)
    assert ds.tokens_N.dtype == np.uint16 and ds.num_rows == len(ref) > 0
    out = ds.get(np.arange(ds.num_rows))
    assert all(out[k].shape == (ds.num_rows, seq_len) for k in FIELDS)
    # No token lost or reordered: rows' inputs + last target rebuild the stream prefix.
    rebuilt = np.concatenate([out["inputs"], out["targets"][:, -1:]], axis=1).reshape(-1)
    assert rebuilt.tolist() == stream[:len(rebuilt)]
    assert (out["inputs"][:, 1:] == out["targets"][:, :-1]).all()
    seg, pos = out["segment_ids"], out["positions"]
    starts = np.diff(seg, axis=1) != 0
    assert set(np.unique(np.diff(seg, axis=1))) <= {0, 1} and (seg[:, 0] == 1).all()
    assert (pos[:, 0] == 0).all()
    assert (pos[:, 1:][starts] == 0).all() and (np.diff(pos, axis=1)[~starts] == 1).all()
    # Mask is 0 exactly where the target starts another document.
    assert (out["loss_mask"][:, :-1] == ~starts).all()
    for r, row in enumerate(ref):
        for k in FIELDS:
            assert out[k][r].tolist() == row[k], (r, k)
    shuffled = np.array([ds.num_rows - 1, 0])
    assert ds.get(shuffled)["positions"].tolist() == [ref[-1]["positions"], ref[0]["positions"]]
    with pytest.raises(IndexError):
        ds.get(np.array([ds.num_rows]))


def test_stdlib_corpus_deterministic_and_split():
    a = load_stdlib_corpus(200_000, 0.02)
    b = load_stdlib_corpus(200_000, 0.02)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert a.train == b.train and a.eval == b.eval and a.train_paths == b.train_paths
    assert a.eval and a.train
    assert not set(a.train_paths) & set(a.eval_paths)
    assert sum(map(len, a.train + a.eval)) == 200_000
    all_paths = a.train_paths + a.eval_paths
    assert all(p.endswith(".py") and "/test/" not in f"/{p}" and "site-packages" not in p
               and "__pycache__" not in p for p in all_paths)
    bigger = load_stdlib_corpus(400_000, 0.02)
    assert bigger.fingerprint != a.fingerprint
    # A file's split depends on its path only, not on how much was read.
    assert set(a.train_paths[:-1]) <= set(bigger.train_paths)


def test_stdlib_corpus_missing_folder(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "x.py").write_text("print(1)\n")
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_stdlib_corpus(10_000, 0.1, root=tmp_path)


def test_build_datasets_stdlib():
    cfg = DataConfig(source="stdlib", seq_len=64, max_bytes=100_000, eval_fraction=0.05)
    bundle = build_datasets(cfg, vocab_size=512)
    assert bundle.tokenizer.vocab_size == 259 and bundle.train.num_rows > 1000
    assert bundle.eval.num_rows >= 1
    assert build_datasets(cfg, vocab_size=259).fingerprint == bundle.fingerprint
    batch = bundle.train.get(np.arange(4))
    assert 0 < batch["inputs"].max() < 259
    with pytest.raises(ConfigError, match="model.vocab_size=258.*259"):
        build_datasets(cfg, vocab_size=258)
    with pytest.raises(ConfigError, match="data.max_bytes"):
        build_datasets(DataConfig(seq_len=200_000, max_bytes=2048), vocab_size=512)


def test_synthetic_dataset():
    cfg = DataConfig(source="synthetic", seq_len=32, seed=3)
    bundle = build_datasets(cfg, vocab_size=100)
    assert bundle.tokenizer is None and bundle.train.num_rows >= 2**30
    rows = np.array([5, 2**31 - 2, 0])
    x, y = bundle.train.get(rows), build_datasets(cfg, 100).train.get(rows)
    for k in FIELDS:
        assert (x[k] == y[k]).all() and x[k].shape == (3, 32)
    assert x["inputs"].min() >= 3 and x["inputs"].max() < 100
    assert len(np.unique(x["inputs"])) > 50  # uniform over [3, 100), not constant
    assert (x["inputs"][:, 1:] == x["targets"][:, :-1]).all()
    assert (x["segment_ids"] == 1).all() and (x["loss_mask"] == 1).all()
    assert x["positions"][1].tolist() == list(range(32))
    assert (bundle.train.get(np.array([7]))["inputs"] == x["inputs"][0]).sum() < 5
    assert not (bundle.eval.get(rows)["inputs"] == x["inputs"]).all()
    other = build_datasets(DataConfig(source="synthetic", seq_len=32, seed=4), 100)
    assert not (other.train.get(rows)["inputs"] == x["inputs"]).all()
    it = DataIterator(bundle.train, 4, seed=0)  # no permutation of 2**31 rows is built
    assert it.next()["inputs"].shape == (4, 32)


class RowIdDataset:
    """Rows whose only content is their own id: makes the iteration order visible."""
    iid_rows = False
    seq_len = 1

    def __init__(self, num_rows):
        self.num_rows = num_rows

    def get(self, row_ids):
        return {"inputs": np.asarray(row_ids)[:, None]}


def _ids(batch):
    return batch["inputs"][:, 0].tolist()


def test_iterator_exact_resume():
    ds = RowIdDataset(50)
    ref = DataIterator(ds, 8, seed=1)
    expected = [_ids(ref.next()) for _ in range(20)]  # crosses several epochs
    for k in (0, 3, 6, 7, 13):
        it = DataIterator(ds, 8, seed=1)
        got = [_ids(it.next()) for _ in range(k)]
        resumed = DataIterator(ds, 8, seed=1)
        resumed.restore(it.state())
        got += [_ids(resumed.next()) for _ in range(20 - k)]
        assert got == expected, k
    assert _ids(DataIterator(ds, 8, seed=2).next()) != expected[0]


def test_iterator_epochs_are_permutations():
    ds = RowIdDataset(24)
    it = DataIterator(ds, 6, seed=0)
    epochs = []
    for e in range(3):
        rows = sum((_ids(it.next()) for _ in range(4)), [])
        assert sorted(rows) == list(range(24))
        assert it.state() == {"rows": 24 * (e + 1), "sources": [{"epoch": e, "index": 24}]}
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(24))
    it2 = DataIterator(ds, 6, seed=0, shuffle=False)
    assert sum((_ids(it2.next()) for _ in range(4)), []) == list(range(24))
    # Epochs run on: 26 rows, batch 6 -> the 5th batch takes the last 2 rows of epoch 0 and
    # the first 4 of epoch 1; no row is dropped.
    it3 = DataIterator(RowIdDataset(26), 6, seed=0)
    rows = sum((_ids(it3.next()) for _ in range(5)), [])
    assert it3.state() == {"rows": 30, "sources": [{"epoch": 1, "index": 4}]}
    assert sorted(rows[:26]) == list(range(26)) and len(set(rows[26:])) == 4


def test_iterator_processes_cover_global_batch():
    ds = RowIdDataset(40)
    one = DataIterator(ds, 8, seed=5)
    two = [DataIterator(ds, 8, seed=5, process_index=p, process_count=2) for p in range(2)]
    for _ in range(12):
        parts = [_ids(it.next()) for it in two]
        assert len(parts[0]) == 4 and parts[0] + parts[1] == _ids(one.next())
    with pytest.raises(ValueError, match="divisible"):
        DataIterator(ds, 8, seed=0, process_index=0, process_count=3)
    evals = [eval_batches(RowIdDataset(5), 4, 3, p, 2) for p in range(2)]
    assert [_ids(b) for b in evals[0]] == [[0, 1], [4, 0], [3, 4]]
    assert [_ids(b) for b in evals[1]] == [[2, 3], [1, 2], [0, 1]]


def test_iterator_errors():
    ds = RowIdDataset(10)
    with pytest.raises(ConfigError, match="train.global_batch_size=16.*10 rows"):
        DataIterator(ds, 16, seed=0)
    it = DataIterator(ds, 2, seed=0)
    good = {"rows": 3, "sources": [{"epoch": 0, "index": 3}]}
    src = lambda **kw: {"rows": 3, "sources": [kw]}  # noqa: E731
    for bad in ({"epoch": 0, "index": 1}, {**good, "x": 2}, {"rows": "0", "sources": []},
                {"rows": 0, "sources": []}, {"rows": 0, "sources": [{"epoch": 0, "index": 0}] * 2},
                src(epoch=0), src(epoch=0, index=1, x=2), src(epoch="0", index=0),
                src(epoch=0, index=1.5), src(epoch=-1, index=0), src(epoch=0, index=11),
                src(epoch=True, index=0), [0, 0], {"rows": -1, "sources": good["sources"]}):
        with pytest.raises(ConfigError, match="state"):
            it.restore(bad)
    it.restore({"rows": np.int64(7), "sources": [{"epoch": np.int64(2), "index": np.array(4)}]})
    assert it.state() == {"rows": 7, "sources": [{"epoch": 2, "index": 4}]}
    assert type(it.state()["sources"][0]["index"]) is int


def test_eval_batches_fixed_and_packed():
    ds = pack_documents([b"x" * n for n in range(1, 30)], TOK, seq_len=8)
    a = eval_batches(ds, 4, 3)
    b = eval_batches(ds, 4, 3)
    assert len(a) == 3 and all(x[k].shape == (4, 8) for x in a for k in FIELDS)
    assert all((x[k] == y[k]).all() for x, y in zip(a, b) for k in FIELDS)
    assert (a[0]["inputs"] == ds.get(np.arange(4))["inputs"]).all()


DATA_CONFIG_ERRORS = [
    (["data.source=files"], "data.source=files needs data.path"),
    (["data.source=tfds"], "data.source=tfds needs data.tfds_name"),
    (["data.source=tokens", "data.token_dtype=int8"],
     "data.token_dtype: 'int8' is not one of: uint16, uint32"),
    (["data.tokenizer=sentencepiece"], "data.tokenizer=sentencepiece needs data.tokenizer_path"),
    (["data.source=mixture"], "data.source=mixture needs data.mixture"),
    (["data.mixture=[{source: stdlib, weight: 1}]"],
     "data.mixture is set but data.source=stdlib"),
    (["data.source=mixture", "data.mixture=[{source: files, weight: 1}]"],
     "data.mixture[0].source=files needs data.mixture[0].path"),
    (["data.source=mixture", "data.mixture=[{source: stdlib, wieght: 1}]"],
     "data.mixture[0]: key 'wieght' cannot be set per source (did you mean 'weight'?)"),
    (["data.source=mixture", "data.mixture=[{source: stdlib, weight: 1, seq_len: 8}]"],
     "data.mixture[0]: key 'seq_len' cannot be set per source"),
    (["data.source=mixture", "data.mixture=[{source: stdlib}]"],
     "data.mixture[0].weight: expected a number > 0, got None"),
    (["data.source=mixture", "data.mixture=[{source: stdlib, weight: 0}]"],
     "data.mixture[0].weight: expected a number > 0, got 0.0"),
    (["data.source=mixture", "data.mixture=[{source: stdlib, weight: x}]"],
     "data.mixture[0].weight: expected a number, got 'x'"),
    (["data.source=mixture", "data.mixture=[{source: mixture, weight: 1}]"],
     "data.mixture[0].source: a mixture entry cannot itself be a mixture"),
    (["data.source=mixture", "data.mixture=[{source: c4, weight: 1}]"],
     "data.mixture[0].source: 'c4' is not one of"),
    (["data.source=mixture", "data.mixture=[{source: stdlib, weight: 1, eval_fraction: 0.9}]"],
     "data.mixture[0].eval_fraction: 0.9 is above the maximum 0.5"),
    (["data.source=mixture", "data.mixture=[stdlib]"],
     "data.mixture[0]: expected a mapping with at least 'source' and 'weight'"),
    (["data.prefetch=-1"], "data.prefetch: -1 is below the minimum 0"),
]


@pytest.mark.parametrize("overrides,message", DATA_CONFIG_ERRORS,
                         ids=[m[:40] for _, m in DATA_CONFIG_ERRORS])
def test_data_config_errors(overrides, message):
    from jaxlm.config import load_config
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
