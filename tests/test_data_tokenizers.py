"""Tokenizers: SentencePiece and Hugging Face files trained here by the CLI, loading errors,
the vocab-size check, and a local corpus tokenized with each."""
import json

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import build_datasets, load_tokenizer
from jaxlm.data.__main__ import main as data_cli

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = TEXT.split() + ["héllo", "wörld", "日本語"]
    docs = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(300)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root, docs


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    root, _ = corpus
    assert data_cli(["train-tokenizer", "--input", str(root), "--out", str(out / "sp.model"),
                     "--vocab-size", "300"]) == 0
    assert data_cli(["train-tokenizer", "--kind", "bpe", "--input", str(root / "*.jsonl"),
                     "--out", str(out / "tokenizer.json"), "--vocab-size", "320"]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    return {"sentencepiece": out / "sp.model", "huggingface": out / "tokenizer.json"}


@pytest.mark.parametrize("kind,vocab", [("sentencepiece", 300), ("huggingface", 320)])
def test_trained_tokenizer_round_trip(trained, kind, vocab):
    tok = load_tokenizer(kind, str(trained[kind]))
    assert tok.vocab_size == vocab and tok.eos_id == 2 and tok.pad_id == 0
    text = "How vexingly quick daft zebras jump! héllo 日本語"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and 0 < len(ids) < len(text.encode())  # merges happened
    assert tok.eos_id not in ids.tolist() and ids.max() < vocab
    assert tok.decode(ids) == text
    batch = tok.encode_batch([text, b"fox", ""])
    assert batch[0].tolist() == ids.tolist() and len(batch[2]) == 0
    assert tok.fingerprint == load_tokenizer(kind, str(trained[kind])).fingerprint


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_files_with_trained_tokenizer(tmp_path, corpus, trained, kind):
    root, docs = corpus
    cfg = DataConfig(source="files", path=str(root), seq_len=32, tokenizer=kind,
                     tokenizer_path=str(trained[kind]), cache_dir=str(tmp_path), eval_fraction=0.1)
    bundle = build_datasets(cfg, vocab_size=512)
    tok = bundle.tokenizer
    assert bundle.train.tokens_N.dtype == np.uint16
    got = []
    for ds in (bundle.train, bundle.eval):
        stream = np.asarray(ds.tokens_N)
        ends = np.flatnonzero(stream == tok.eos_id)
        assert len(ends) == len(ds.doc_starts_D) and (ds.doc_starts_D[1:] == ends[:-1] + 1).all()
        got += [tok.decode(stream[s:e]) for s, e in zip(ds.doc_starts_D, ends)]
    assert sorted(got) == sorted(docs)  # lossless through tfds, tokenizer and cache
    with pytest.raises(ConfigError, match=rf"model.vocab_size=100 is smaller than the {kind} "
                                          rf"tokenizer's vocabulary \((300|320)\)"):
        build_datasets(cfg, vocab_size=100)
    other = build_datasets(DataConfig(source="files", path=str(root), seq_len=32,
                                      cache_dir=str(tmp_path), eval_fraction=0.1), 512)
    assert other.fingerprint != bundle.fingerprint  # the tokenizer keys the cache


def test_tokenizer_file_errors(tmp_path, trained):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 3)
    with pytest.raises(ConfigError, match=r"junk\.model: not a SentencePiece model"):
        load_tokenizer("sentencepiece", str(junk))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ConfigError, match=r"tokenizer\.json: not a Hugging Face tokenizer"):
        load_tokenizer("huggingface", str(bad_json))
    with pytest.raises(ConfigError, match=r"data.tokenizer_path: .*missing\.model: tokenizer "
                                          r"file not found"):
        load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    # A tokenizer.json without an end-of-document token, and one named by its config.
    spec = json.loads(trained["huggingface"].read_text())
    for t in spec["added_tokens"]:
        t["content"] = {"</s>": "<end>"}.get(t["content"], t["content"])
    spec["model"]["vocab"]["<end>"] = spec["model"]["vocab"].pop("</s>")
    no_eos = tmp_path / "noeos" / "tokenizer.json"
    no_eos.parent.mkdir()
    no_eos.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"noeos/tokenizer\.json: no end-of-document token"):
        load_tokenizer("huggingface", str(no_eos))
    (no_eos.parent / "tokenizer_config.json").write_text('{"eos_token": {"content": "<end>"}}')
    assert load_tokenizer("huggingface", str(no_eos)).eos_id == 2
    assert data_cli(["train-tokenizer", "--input", str(tmp_path / "none*.txt"),
                     "--out", str(tmp_path / "x.model")]) == 2
    assert not (tmp_path / "x.model").exists()


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "huggingface"])
def test_streamed_text_equals_the_whole_decode(trained, kind):
    """TextStream decodes only the tokens since its last settled point (with a few before
    them): pushed one or several at a time, the pieces join to exactly the whole decode, for
    real text (multi-byte characters split over tokens) and for random ids."""
    from jaxlm.generate.text import TextStream
    tok = load_tokenizer(kind, None if kind == "byte" else str(trained[kind]))
    rng = np.random.default_rng(1)
    real = tok.encode("How vexingly quick daft zebras jump! héllo wörld 日本語 " * 3).tolist()
    for ids in (real, rng.integers(3, tok.vocab_size, 120).tolist()):
        for chunk in (1, 3):
            stream = TextStream(tok)
            pieces = [stream.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
            assert "".join(pieces) + stream.finish() == tok.decode(ids), (kind, chunk)
