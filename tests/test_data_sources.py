"""Data sources: local files (via a tfds dataset + token cache), tfds datasets (built here and
mocked), pre-tokenized token files, and every bad-input case with its one clear error."""
import json
import os

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import ByteTokenizer, build_datasets
from jaxlm.data import tfds_source

TOK = ByteTokenizer()


def _docs_of(stream_N, eos=TOK.eos_id):
    """Documents of a token stream (each ends in eos) as decoded text."""
    ends = np.flatnonzero(np.asarray(stream_N) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [TOK.decode(stream_N[s:e]) for s, e in zip(starts, ends)]


def _write_corpus(root, n_jsonl=40):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "é", "日本", "🐍", "x" * 30]
    doc = lambda: " ".join(rng.choice(words, rng.integers(3, 40)))  # noqa: E731
    texts = []
    (root / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt"):
        texts.append(doc() + "\nline two\n")
        (root / name).write_text(texts[-1])
    lines = []
    for i in range(n_jsonl):
        texts.append(doc())
        lines.append(json.dumps({"id": i, "body": texts[-1]}))
        if i == 5:
            lines.append("")  # blank lines are skipped
    (root / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [doc() for _ in range(30)]
    texts += rows
    pq.write_table(pa.table({"body": rows, "n": list(range(30))}), root / "d.parquet")
    return texts


def _files_cfg(tmp_path, **kw):
    return DataConfig(**{"source": "files", "path": str(tmp_path / "corpus"), "seq_len": 16,
                         "text_field": "body", "eval_fraction": 0.2,
                         "cache_dir": str(tmp_path / "cache"), **kw})


def test_files_source_lossless_split_and_cached(tmp_path, monkeypatch):
    texts = _write_corpus(tmp_path / "corpus")
    cfg = _files_cfg(tmp_path)
    bundle = build_datasets(cfg, vocab_size=300)
    train_docs, eval_docs = _docs_of(bundle.train.tokens_N), _docs_of(bundle.eval.tokens_N)
    # Every document exactly once, in train or eval; no token lost.
    assert sorted(train_docs + eval_docs) == sorted(texts)
    assert 0 < len(eval_docs) < len(train_docs)
    assert len(bundle.train.doc_starts_D) == len(train_docs)
    row = bundle.train.get(np.array([0]))
    assert row["inputs"].shape == (1, 16) and row["segment_ids"].max() >= 1
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp")]
    assert len(list((cache / "tokens").iterdir())) == 1
    # A second build reads the token cache only: no tfds, no text.
    monkeypatch.setattr(tfds_source, "local_corpus", lambda *a: pytest.fail("rebuilt"))
    again = build_datasets(cfg, vocab_size=300)
    assert again.fingerprint == bundle.fingerprint
    assert (np.asarray(again.train.tokens_N) == np.asarray(bundle.train.tokens_N)).all()
    monkeypatch.undo()
    # The split follows the document keys, not the corpus size or order.
    extra = tmp_path / "corpus" / "e.txt"
    extra.write_text("one more document")
    grown = build_datasets(cfg, vocab_size=300)
    assert grown.fingerprint != bundle.fingerprint
    assert set(eval_docs) <= set(_docs_of(grown.eval.tokens_N))
    assert sorted(_docs_of(grown.train.tokens_N) + _docs_of(grown.eval.tokens_N)) == \
        sorted(texts + ["one more document"])


def _bad(tmp_path, name, content):
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    (root / "ok.jsonl").write_text('{"body": "fine"}\n')
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return str(path)


BAD_FILES = [
    ("empty.jsonl", "", r"empty\.jsonl: empty file"),
    ("empty.txt", "", r"empty\.txt: empty file"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: no documents"),
    ("bad.jsonl", '{"body": "a"}\n{"body": "b"\n', r"bad\.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"body": "a"}\n\n{"text": "b"}\n',
     r"field\.jsonl:3: no field 'body' \(data.text_field\); fields here: 'text'"),
    ("type.jsonl", '{"body": 3}\n', r"type\.jsonl:1: field 'body' is int"),
    ("list.jsonl", '[1, 2]\n', r"list\.jsonl:1: no field 'body'"),
    ("utf8.txt", b"fine\nstill fine\nbad \xff here\n", r"utf8\.txt:3: not valid UTF-8"),
    ("utf8.jsonl", b'{"body": "a"}\n{"body": "\xfe"}\n', r"utf8\.jsonl:2: not valid UTF-8"),
    ("col.parquet", "parquet:other", r"col\.parquet: no column 'body'.*columns: other"),
    ("broken.parquet", b"PAR1 this is not parquet", r"broken\.parquet: cannot read parquet"),
]


@pytest.mark.parametrize("name,content,match", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_files_bad_input(tmp_path, name, content, match):
    if content == "parquet:other":
        import pyarrow as pa
        import pyarrow.parquet as pq
        _bad(tmp_path, name, None)
        pq.write_table(pa.table({"other": ["x"]}), tmp_path / "corpus" / name)
    else:
        _bad(tmp_path, name, content)
    with pytest.raises(ConfigError, match=match):
        build_datasets(_files_cfg(tmp_path), vocab_size=300)
    # Nothing half-written stays in the cache: no temp folder, no corpus, no token entry.
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []


def test_files_missing_path_and_single_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path: .*nope\*\.jsonl: no such file"):
        build_datasets(_files_cfg(tmp_path, path=str(tmp_path / "nope*.jsonl")), 300)
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "notes.csv").write_text("a,b\n")  # a folder ignores other files
    with pytest.raises(ConfigError, match=r"notes\.csv: unsupported file type '\.csv'"):
        build_datasets(_files_cfg(tmp_path, path=str(tmp_path / "corpus" / "notes.csv")), 300)
    glob_cfg = _files_cfg(tmp_path, path=str(tmp_path / "corpus" / "**" / "*.jsonl"))
    bundle = build_datasets(glob_cfg, 300)
    assert len(_docs_of(bundle.train.tokens_N)) + len(_docs_of(bundle.eval.tokens_N)) == 40
    one = _files_cfg(tmp_path, path=str(tmp_path / "corpus" / "a.txt"), seq_len=4)
    with pytest.raises(ConfigError, match="train split has no full row"):
        build_datasets(one, 300)  # a single document goes to eval, leaving train empty


# ---------------------------------------------------------------- tfds


def _tiny_builder_cls():
    import tensorflow_datasets as tfds

    class TinyDocs(tfds.core.GeneratorBasedBuilder):
        """Two splits of numbered documents."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"meta": {"body": tfds.features.Text()}, "label": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", 60),
                    "validation": self._generate_examples("val", 12)}

        def _generate_examples(self, prefix, n):
            for i in range(n):
                yield i, {"meta": {"body": f"{prefix} document {i} " + "z" * (i % 7)}, "label": i}

    return TinyDocs


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = _tiny_builder_cls()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return data_dir


def _tfds_cfg(tmp_path, data_dir, **kw):
    return DataConfig(**{"source": "tfds", "tfds_name": "tiny_docs",
                         "tfds_data_dir": str(data_dir), "text_field": "meta/body",
                         "seq_len": 8, "cache_dir": str(tmp_path / "cache"), **kw})


def test_tfds_dataset_built_here(tmp_path, tiny_tfds):
    bundle = build_datasets(_tfds_cfg(tmp_path, tiny_tfds, tfds_eval_split="validation"), 300)
    expect = lambda p, n: sorted(f"{p} document {i} " + "z" * (i % 7) for i in range(n))  # noqa
    assert sorted(_docs_of(bundle.train.tokens_N)) == expect("train", 60)
    assert sorted(_docs_of(bundle.eval.tokens_N)) == expect("val", 12)
    held = build_datasets(_tfds_cfg(tmp_path, tiny_tfds, eval_fraction=0.25), 300)
    train, evals = _docs_of(held.train.tokens_N), _docs_of(held.eval.tokens_N)
    assert sorted(train + evals) == expect("train", 60) and 3 < len(evals) < 30
    assert held.fingerprint != bundle.fingerprint


def test_tfds_errors(tmp_path, tiny_tfds):
    with pytest.raises(ConfigError, match=r"no feature 'body' .*features: label, meta"):
        build_datasets(_tfds_cfg(tmp_path, tiny_tfds, text_field="body"), 300)
    with pytest.raises(ConfigError, match=r"feature 'label' is int"):
        build_datasets(_tfds_cfg(tmp_path, tiny_tfds, text_field="label"), 300)
    with pytest.raises(ConfigError, match=r"tfds_eval_split='test'.*Unknown split"):
        build_datasets(_tfds_cfg(tmp_path, tiny_tfds, tfds_eval_split="test"), 300)
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match=r"no registered tfds dataset .*none prepared"):
        build_datasets(_tfds_cfg(tmp_path, empty, tfds_name="no_such_dataset_xyz"), 300)
    # Registered in tfds's catalog but not prepared here: says how, never downloads.
    with pytest.raises(ConfigError, match=r"imdb_reviews: not prepared under .*never downloads"
                                          r".*tfds build imdb_reviews .*array_record"):
        build_datasets(_tfds_cfg(tmp_path, empty, tfds_name="imdb_reviews"), 300)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.tokens"))


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_tfds_corrupted_shard(tmp_path, tiny_tfds, damage):
    import shutil
    data_dir = tmp_path / "copy"
    shutil.copytree(tiny_tfds, data_dir)
    shard = next(data_dir.rglob("tiny_docs-train.array_record-*"))
    raw = shard.read_bytes()
    n = len(raw)
    raw = raw[:100] + bytes(n // 2) + raw[100 + n // 2:] if damage == "zeroed" else raw[:n // 2]
    shard.write_bytes(raw)
    with pytest.raises(ConfigError, match=rf"{shard}: .*record.* (truncated or )?corrupted"):
        build_datasets(_tfds_cfg(tmp_path, data_dir), 300)
    assert not list((tmp_path / "cache").rglob("*.tokens"))  # no half-written entry


def test_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    cfg = _tfds_cfg(tmp_path, tmp_path / "nowhere", tfds_name="imdb_reviews", text_field="text",
                    eval_fraction=0.3)
    with tfds.testing.mock_data(num_examples=40):
        bundle = build_datasets(cfg, 300)
    docs = _docs_of(bundle.train.tokens_N) + _docs_of(bundle.eval.tokens_N)
    assert len(docs) == 40 and len(set(docs)) > 1
    assert bundle.train.num_rows > 0 and bundle.eval.num_rows > 0


# ---------------------------------------------------------------- pre-tokenized files


def _token_stream(rng, n_docs, top=300, eos=TOK.eos_id):
    docs = [rng.integers(3, top, rng.integers(1, 30)) for _ in range(n_docs)]
    return np.concatenate([np.append(d, eos) for d in docs]), docs


@pytest.mark.parametrize("suffix,dtype", [(".bin", np.uint16), (".npy", np.uint32)])
def test_token_file(tmp_path, suffix, dtype):
    stream, docs = _token_stream(np.random.default_rng(1), 200)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, stream.astype(dtype))
    else:
        stream.astype(dtype).tofile(path)
    cfg = DataConfig(source="tokens", path=str(path), seq_len=8, eval_fraction=0.1)
    bundle = build_datasets(cfg, vocab_size=300)
    train, evals = np.asarray(bundle.train.tokens_N), np.asarray(bundle.eval.tokens_N)
    assert (np.concatenate([train, evals]) == stream).all()
    assert train[-1] == TOK.eos_id  # eval starts at a document start
    assert 0.08 < len(evals) / len(stream) < 0.2
    ends = np.flatnonzero(stream == TOK.eos_id) + 1
    assert bundle.train.doc_starts_D.tolist() == [0] + ends[ends < len(train)].tolist()
    assert bundle.eval.doc_starts_D[0] == 0 and len(bundle.eval.doc_starts_D) == \
        (ends > len(train)).sum()


def test_token_file_errors(tmp_path):
    cfg = lambda p, **kw: DataConfig(source="tokens", path=str(p), seq_len=4, **kw)  # noqa
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ConfigError, match=r"odd\.bin: not a token file .*whole number of uint16"):
        build_datasets(cfg(odd), 300)
    big = tmp_path / "big.bin"
    np.array([5, 6, 300, 2], np.uint32).tofile(big)
    with pytest.raises(ConfigError, match=r"big\.bin: token id 300 is outside .*vocab_size=300"):
        build_datasets(cfg(big, token_dtype="uint32"), 300)
    flat = tmp_path / "two_d.npy"
    np.save(flat, np.zeros((3, 4), np.uint16))
    with pytest.raises(ConfigError, match=r"two_d\.npy: expected a non-empty 1-D integer"):
        build_datasets(cfg(flat), 300)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.bin: expected a non-empty"):
        build_datasets(cfg(empty), 300)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    with pytest.raises(ConfigError, match=r"junk\.npy: not a token file"):
        build_datasets(cfg(junk), 300)
    with pytest.raises(ConfigError, match=r"missing\.bin: token file not found"):
        build_datasets(cfg(tmp_path / "missing.bin"), 300)


def test_token_cache_damage_is_reported(tmp_path):
    _write_corpus(tmp_path / "corpus")
    cfg = _files_cfg(tmp_path)
    build_datasets(cfg, 300)
    entry = next((tmp_path / "cache" / "tokens").iterdir())
    tokens = entry / "train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-6])
    with pytest.raises(ConfigError, match=rf"token cache {entry} is damaged .*delete that folder"):
        build_datasets(cfg, 300)
    os.remove(entry / "meta.json")
    with pytest.raises(ConfigError, match=rf"token cache {entry} is damaged .*meta.json"):
        build_datasets(cfg, 300)
    import shutil
    shutil.rmtree(entry)
    assert build_datasets(cfg, 300).train.num_rows > 0  # rebuilt from the cached tfds corpus
