"""The masked-LM and span-corruption batches: statistics of the random draws, exact content
(targets, reconstruction of the text), per-example layout, determinism by row / piece id, exact
resume, special ids from each kind of tokenizer, and one-line errors for bad settings."""
import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import ByteTokenizer, build_datasets, pack_documents
from jaxlm.data.span_corruption import SpanCorruptionDataset
from jaxlm.data.span_plan import example_lengths, noise_counts, span_lengths
from jaxlm.data.special_ids import special_ids
from test_data_iterator import _run as _read  # batches of simulated processes, resumed

TOK = ByteTokenizer()
SIGMAS = 4.0  # statistical checks: within 4 standard deviations (about 6e-5 two-sided)


def _within(count, n, p):
    """count successes in n trials is within SIGMAS binomial standard deviations of n * p."""
    return abs(count - n * p) <= SIGMAS * np.sqrt(n * p * (1 - p))


def _docs(seed, n, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(32, 127, rng.integers(lo, hi)).astype(np.uint8))
            for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
                                    for x, y in zip(a, b))


def _assert_resumes(dataset, total=24, k=9):
    reference, _ = _read(dataset, total)
    first, state = _read(dataset, k, procs=2)
    rest, _ = _read(dataset, total - k, procs=4, state=state, prefetch=2)
    assert _same(first + rest, reference)


# ---------------------------------------------------------------- masked LM

@pytest.fixture(scope="module")
def mlm():
    cfg = DataConfig(source="stdlib", seq_len=128, max_bytes=300_000, eval_fraction=0.05)
    return build_datasets(cfg, 512, objective="mlm"), build_datasets(cfg, 512)


def test_mlm_fields_targets_and_statistics(mlm):
    bundle, causal = mlm
    rows = np.arange(min(bundle.train.num_rows, 1500))
    x, packed = bundle.train.get(rows), causal.train.get(rows)
    assert bundle.fields == causal.fields  # same names, all [B, seq_len]
    assert {k: (v.shape, v.dtype) for k, v in x.items()} == {
        k: ((len(rows), n), dt) for k, (n, dt) in bundle.fields.items()}
    # A row is the first seq_len tokens of the packed row: targets are those tokens, unmasked.
    assert (x["targets"] == packed["inputs"]).all()
    assert (x["positions"] == packed["positions"]).all()
    assert (x["segment_ids"] == packed["segment_ids"]).all()
    sp = bundle.special_ids
    assert sp.mask_id == TOK.mask_id == 259
    selected = x["loss_mask"] == 1
    assert set(np.unique(x["loss_mask"])) == {0.0, 1.0}
    assert (x["inputs"][~selected] == x["targets"][~selected]).all()
    eligible = (x["targets"] >= 3) & (x["targets"] < 259)
    assert not (selected & ~eligible).any()  # never eos (each document's end), pad or bos
    assert (x["targets"] == TOK.eos_id).sum() > 5
    n_sel, n = selected.sum(), eligible.sum()
    assert _within(n_sel, n, 0.15), (n_sel, n)
    # 80% mask, 10% random regular id (which may equal the original: 1 in 256), 10% unchanged.
    got = x["inputs"][selected]
    masked, same = (got == sp.mask_id).sum(), (got == x["targets"][selected]).sum()
    randomised = n_sel - masked - same
    R = len(sp.regular_ids_R)
    assert R == 256
    assert _within(masked, n_sel, 0.8), masked
    assert _within(randomised, n_sel, 0.1 * (1 - 1 / R)), randomised
    assert _within(same, n_sel, 0.1 + 0.1 / R), same
    replaced = got[(got != sp.mask_id) & (got != x["targets"][selected])]
    assert ((replaced >= 3) & (replaced < 259)).all() and len(np.unique(replaced)) > 50


def test_mlm_masks_depend_only_on_row_id(mlm):
    bundle, _ = mlm
    a = bundle.train.get(np.array([5, 9, 700]))
    b = bundle.train.get(np.array([700, 5]))
    again = build_datasets(DataConfig(source="stdlib", seq_len=128, max_bytes=300_000,
                                      eval_fraction=0.05), 512, objective="mlm")
    c = again.train.get(np.array([9]))
    for k in a:
        assert (a[k][[2, 0]] == b[k]).all() and (a[k][1] == c[k][0]).all(), k
    # other rows, another split, another seed: other masks
    assert not (a["loss_mask"][0] == a["loss_mask"][1]).all()
    assert not (bundle.eval.get(np.array([5]))["loss_mask"] == a["loss_mask"][0]).all()
    other = build_datasets(DataConfig(source="stdlib", seq_len=128, max_bytes=300_000,
                                      eval_fraction=0.05, seed=1), 512, objective="mlm")
    assert not (other.train.get(np.array([5]))["loss_mask"] == a["loss_mask"][0]).all()


def test_mlm_resume_exact(mlm):
    _assert_resumes(mlm[0].train)


def test_mlm_never_selects_special_ids_in_the_text(tmp_path):
    """A token file holding pad, bos, mask and sentinel-range ids among the text: only the
    tokenizer's regular ids are ever selected."""
    rng = np.random.default_rng(0)
    specials = [0, 1, TOK.mask_id, TOK.sentinel_id(0), TOK.sentinel_id(1)]
    docs = [np.append(rng.choice(np.r_[3:259, specials * 40], rng.integers(5, 80)), 2)
            for _ in range(400)]
    path = tmp_path / "t.bin"
    np.concatenate(docs).astype(np.uint16).tofile(path)
    cfg = DataConfig(source="tokens", path=str(path), seq_len=64, eval_fraction=0.1)
    x = build_datasets(cfg, 300, objective="mlm").train.get(np.arange(100))
    special = np.isin(x["targets"], specials + [2])
    assert special.sum() > 1000 and not (x["loss_mask"][special] == 1).any()
    assert (x["loss_mask"] == 1).sum() > 500


def test_mlm_synthetic_takes_mask_from_the_top():
    cfg = DataConfig(source="synthetic", seq_len=64, seed=3)
    bundle = build_datasets(cfg, 100, objective="mlm")
    assert bundle.special_ids.mask_id == 99 and bundle.tokenizer is None
    assert "segment_ids" not in bundle.fields  # one document per row, as for causal LM
    x = bundle.train.get(np.arange(50))
    assert x["targets"].min() >= 3 and x["targets"].max() < 99  # rows draw below the mask
    selected = x["loss_mask"] == 1
    assert (x["inputs"][selected] == 99).mean() > 0.6 and (x["inputs"][~selected] < 99).all()
    causal = build_datasets(cfg, 100).train.get(np.arange(50))  # unchanged: all of [3, 100)
    assert causal["inputs"].max() == 99


# ---------------------------------------------------------------- span corruption

S, DENSITY, MEAN = 64, 0.15, 3.0


@pytest.fixture(scope="module")
def s2s():
    # long documents are cut into pieces; short ones share rows
    docs = _docs(1, 300, 1, 60) + _docs(2, 20, 100, 400)
    packed = pack_documents(docs, TOK, S)
    lengths = span_lengths(S, 0, DENSITY, MEAN)
    specials = special_ids(TOK, 512, "seq2seq", False, lengths.max_spans)
    return SpanCorruptionDataset(packed, lengths, specials, seed=0, split=0), packed


def test_span_lengths_follow_t5():
    full = span_lengths(512, 0, 0.15, 3.0)
    assert (full.piece_len, full.target_len, full.max_spans) == (568, 114, 28)  # T5's figures
    assert span_lengths(512, 200, 0.15, 3.0).target_len == 200
    enc, dec = example_lengths(np.arange(2, 2000), 0.15, 3.0)
    assert (np.diff(enc) >= 0).all() and (np.diff(dec) >= 0).all()  # so one bound serves all
    noise, spans = noise_counts(np.array([2, 10, 568]), 0.15, 3.0)
    assert noise.tolist() == [1, 2, 85] and spans.tolist() == [1, 1, 28]


def _examples(x, b):
    """(encoder, decoder inputs, targets) of each example of row b, by segment id."""
    seg, dseg = x["segment_ids"][b], x["decoder_segment_ids"][b]
    n = seg.max()
    assert dseg.max() == n and n >= 1
    return [(x["inputs"][b][seg == k], x["decoder_inputs"][b][dseg == k],
             x["targets"][b][dseg == k]) for k in range(1, n + 1)]


def _reconstruct(enc, targets, sentinels):
    """Replace each sentinel in the encoder input by the target span after that sentinel;
    returns the text and which of its tokens were noise."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = sentinels.index(t)
            spans[current] = []
        else:
            spans[current].append(t)
    out, noise = [], []
    for t in enc[:-1]:
        span = spans[sentinels.index(t)] if t in sentinels else [t]
        out += span
        noise += [t in sentinels] * len(span)
    return out, np.array(noise)


def test_span_corruption_reconstructs_every_piece(s2s):
    ds, packed = s2s
    sp = ds.specials
    sentinels = sp.sentinel_ids_K.tolist()
    x = ds.get(np.arange(ds.num_rows))
    pieces = ds.pieces
    stream = np.asarray(packed.tokens_N)
    full_noise = full_spans = full_raw = 0
    span_lengths_seen = []
    # the first part of each random partition (leading non-noise, first noise span) against
    # that of a uniformly random composition of its total into k positive parts
    deviation, variance = np.zeros(2), np.zeros(2)
    for r in range(ds.num_rows):
        pids = range(pieces.row_first_R1[r], pieces.row_first_R1[r + 1])
        examples = _examples(x, r)
        assert len(examples) == len(pids)
        for pid, (enc, dec_in, tgt) in zip(pids, examples):
            start, L = pieces.start_P[pid], pieces.length_P[pid]
            raw = stream[start:start + L].tolist()
            assert enc[-1] == tgt[-1] == TOK.eos_id and dec_in[0] == sp.pad_id
            assert (dec_in[1:] == tgt[:-1]).all()  # shifted right within the example
            text, noise_mask = _reconstruct(enc.tolist(), tgt.tolist(), sentinels)
            assert text == raw
            used = [t for t in tgt if t in sentinels]
            k = len(used)
            assert used == sentinels[:k] == [t for t in enc if t in sentinels]
            assert enc[-2] == sentinels[k - 1]  # the last span is noise (non-noise first)
            noise, spans = noise_counts(np.array([L]), DENSITY, MEAN)
            assert k == spans[0] and len(tgt) - k - 1 == noise[0]
            if L == ds.lengths.piece_len:
                full_noise, full_spans, full_raw = full_noise + noise[0], full_spans + k, \
                    full_raw + L
                span_lengths_seen += np.diff(np.flatnonzero(np.diff(np.r_[0, noise_mask, 0])))[
                    ::2].tolist()
            lead = int(np.argmax(noise_mask))
            first_span = int(np.argmin(noise_mask[lead:])) or L - lead
            for i, (part, total) in enumerate(((lead, L - noise[0]), (first_span, noise[0]))):
                n = total - k  # part - 1 is beta-binomial(n, 1, k - 1)
                deviation[i] += part - total / k
                variance[i] += n * (k - 1) * (k + n) / (k * k * (k + 1))
    # Full pieces: the density and mean span length up to the rounding of one piece's counts.
    assert full_raw > 1000
    assert abs(full_noise / full_raw - DENSITY) <= 0.5 / ds.lengths.piece_len + 1e-9
    assert abs(full_noise / full_spans - MEAN) <= 0.5 * MEAN / ds.lengths.max_spans
    assert len(span_lengths_seen) == full_spans and np.mean(span_lengths_seen) == \
        full_noise / full_spans and len(set(span_lengths_seen)) >= 4  # random, not fixed
    assert (np.abs(deviation) <= SIGMAS * np.sqrt(variance)).all(), (deviation, variance)
    assert (variance > 100).all(), variance


def test_span_corruption_pieces_cover_the_documents(s2s):
    ds, packed = s2s
    p = ds.pieces
    # 70 raw tokens: 10 noise in 3 spans -> 70 - 10 + 3 + 1 = 64 encoder tokens; 71 would need 65
    assert p.length_P.max() == ds.lengths.piece_len == 70 and p.length_P.min() >= 2
    ends = np.append(packed.doc_starts_D[1:], len(packed.tokens_N)) - 1  # each doc's eos
    covered = np.zeros(len(packed.tokens_N), int)
    np.add.at(covered, np.concatenate([np.arange(s, s + n) for s, n in
                                       zip(p.start_P, p.length_P)]), 1)
    assert covered.max() == 1 and covered[ends].sum() == 0
    lone = np.flatnonzero(covered == 0)  # eos, and the 1-token pieces that are dropped
    dropped = lone[~np.isin(lone, ends)]
    assert (np.asarray(packed.tokens_N)[dropped + 1] == TOK.eos_id).all() and len(dropped) < 20
    assert (np.diff(p.start_P) > 0).all()  # in stream order


def test_span_corruption_row_layout(s2s):
    ds, _ = s2s
    x = ds.get(np.arange(ds.num_rows))
    B, T = ds.num_rows, ds.target_len
    assert ds.fields == {**{k: (S, np.int32) for k in ("inputs", "positions", "segment_ids")},
                         **{k: (T, np.int32) for k in ("decoder_inputs", "targets",
                                                       "decoder_positions",
                                                       "decoder_segment_ids")},
                         "loss_mask": (T, np.float32)}
    assert all(x[k].shape == (B, n) and x[k].dtype == dt for k, (n, dt) in ds.fields.items())
    for seg, pos, tok in ((x["segment_ids"], x["positions"], x["inputs"]),
                          (x["decoder_segment_ids"], x["decoder_positions"], x["targets"])):
        steps = np.diff(seg, axis=1)
        pad = seg == 0
        assert (seg[:, 0] == 1).all() and np.isin(steps[~pad[:, 1:]], [0, 1]).all()
        assert (np.diff(pad.astype(int), axis=1) >= 0).all()  # padding only after the last
        assert (pos[pad] == 0).all() and (tok[pad] == 0).all()
        new = np.concatenate([np.ones((B, 1), bool), steps != 0], axis=1) & ~pad
        assert (pos[new] == 0).all()
        assert (pos[:, 1:][~new[:, 1:] & ~pad[:, 1:]] == pos[:, :-1][~new[:, 1:] &
                                                                   ~pad[:, 1:]] + 1).all()
    assert (x["loss_mask"] == (x["decoder_segment_ids"] > 0)).all()
    assert (x["decoder_inputs"][x["decoder_segment_ids"] == 0] == 0).all()
    # Greedy: the next row's first example would not have fit on either side.
    enc_used = (x["segment_ids"] > 0).sum(1)
    dec_used = (x["decoder_segment_ids"] > 0).sum(1)
    first_enc = (x["segment_ids"] == 1).sum(1)
    first_dec = (x["decoder_segment_ids"] == 1).sum(1)
    assert ((enc_used[:-1] + first_enc[1:] > S) | (dec_used[:-1] + first_dec[1:] > T)).all()
    assert (x["segment_ids"].max(1) > 1).mean() > 0.2  # short documents do share rows


def test_span_corruption_deterministic_by_piece_and_resumes(s2s):
    ds, packed = s2s
    a = ds.get(np.array([3, 10, 4]))
    b = ds.get(np.array([10]))
    fresh = SpanCorruptionDataset(packed, ds.lengths, ds.specials, seed=0, split=0)
    c = fresh.get(np.array([4, 3]))
    for k in a:
        assert (a[k][1] == b[k][0]).all() and (a[k][[2, 0]] == c[k]).all(), k
    other = SpanCorruptionDataset(packed, ds.lengths, ds.specials, seed=1, split=0)
    assert not (other.get(np.array([3]))["targets"] == a["targets"][0]).all()
    _assert_resumes(ds)


def test_seq2seq_from_config_and_synthetic():
    cfg = DataConfig(source="stdlib", seq_len=S, max_bytes=100_000, eval_fraction=0.05)
    bundle = build_datasets(cfg, 512, objective="seq2seq")
    assert bundle.fields["targets"] == (span_lengths(S, 0, DENSITY, MEAN).target_len, np.int32)
    assert bundle.fingerprint != build_datasets(cfg, 512).fingerprint
    assert bundle.eval.num_rows > 0
    wider = build_datasets(DataConfig(**{**cfg.__dict__, "target_len": 40}), 512, "seq2seq")
    assert wider.fields["decoder_inputs"] == (40, np.int32)
    syn = build_datasets(DataConfig(source="synthetic", seq_len=S), 100, objective="seq2seq")
    K = syn.special_ids.sentinel_ids_K
    assert K.tolist() == [98 - i for i in range(len(K))]  # sentinel i = V - 2 - i
    x = syn.train.get(np.array([0, 2**31 - 2]))
    assert (x["segment_ids"].max(1) == 1).all()  # one full piece per row
    regular = (x["inputs"] >= 3) & (x["inputs"] < 99 - len(K))  # below the reserved top
    assert (x["inputs"] == 2).sum() == 2
    assert (regular | np.isin(x["inputs"], K) | (x["inputs"] == 2) | (x["inputs"] == 0)).all()
    assert (syn.train.get(np.array([2**31 - 2]))["targets"] == x["targets"][1]).all()


# ---------------------------------------------------------------- special ids and bad input

def _hf_tokenizer(path, extra=()):
    from tokenizers import Tokenizer, models
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b", *extra])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", *extra])
    tok.save(str(path))
    return path


def _one_line_error(fn, *args, **kw):
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_special_ids_from_tokenizer_files(tmp_path):
    from jaxlm.data import load_tokenizer
    extra = ["[MASK]"] + [f"<extra_id_{i}>" for i in range(3)]
    with_all = load_tokenizer("huggingface", str(_hf_tokenizer(tmp_path / "a.json", extra)))
    assert with_all.mask_id == 6 and [with_all.sentinel_id(i) for i in range(3)] == [7, 8, 9]
    sp = special_ids(with_all, 16, "mlm", True, 0)
    assert sp.regular_ids_R.tolist() == [3, 4, 5] and sp.mask_id == 6
    bare = load_tokenizer("huggingface", str(_hf_tokenizer(tmp_path / "b.json")))
    msg = _one_line_error(special_ids, bare, 16, "mlm", True, 0)
    assert "b.json: the huggingface tokenizer has no mask token" in msg and "[MASK]" in msg
    msg = _one_line_error(special_ids, with_all, 16, "seq2seq", False, 5)
    assert "a.json" in msg and "<extra_id_3>" in msg
    msg = _one_line_error(special_ids, with_all, 6, "mlm", True, 0)
    assert "model.vocab_size=6 does not cover id 6, the mask token of the huggingface" in msg
    import sentencepiece as spm
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 50), model_writer=model, vocab_size=40,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>"],
        minloglevel=2, hard_vocab_limit=False)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    sp_tok = load_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
    assert sp_tok.mask_id == 4 and {0, 1, 2, 4} <= set(sp_tok.special_ids())
    msg = _one_line_error(special_ids, sp_tok, 64, "seq2seq", False, 1)
    assert "sp.model" in msg and "<extra_id_0>" in msg


@pytest.mark.parametrize("objective,vocab,expect", [
    ("mlm", 259, "model.vocab_size=259 does not cover id 259, the mask token of the byte "
                 "tokenizer, which the mlm objective emits; set model.vocab_size >= 260"),
    ("seq2seq", 270, "model.vocab_size=270 does not cover id 287, sentinel 27 of the byte "
                     "tokenizer (28 sentinels needed)"),
])
def test_vocab_must_cover_the_special_ids(objective, vocab, expect):
    cfg = DataConfig(source="stdlib", seq_len=512, max_bytes=50_000, eval_fraction=0.1)
    assert expect in _one_line_error(build_datasets, cfg, vocab, objective=objective)


@pytest.mark.parametrize("cfg,objective,expect", [
    (dict(seq_len=512, target_len=100), "seq2seq",
     "data.target_len=100 is too small: a full piece of 568 tokens (the longest whose encoder "
     "input fits data.seq_len=512 at data.noise_density=0.15, data.mean_noise_span_length=3.0) "
     "needs 114 decoder tokens; set data.target_len >= 114, or 0 to derive it"),
    (dict(seq_len=2), "seq2seq", "data.seq_len=2 is too small for span corruption"),
    (dict(source="synthetic"), "seq2seq", "model.vocab_size=18 is too small for synthetic "
                                          "seq2seq data"),
    (dict(), "prefix_lm", "model objective 'prefix_lm' has no data transform"),
])
def test_bad_objective_settings(cfg, objective, expect):
    cfg = DataConfig(**{"max_bytes": 50_000, "eval_fraction": 0.1, **cfg})
    assert expect in _one_line_error(build_datasets, cfg, 18 if cfg.source == "synthetic"
                                     else 512, objective=objective)


@pytest.mark.parametrize("override,expect", [
    ("data.mlm_probability=0", "data.mlm_probability: 0.0 is out of range; expected a value "
                               "strictly above 0.0 and below 1.0"),
    ("data.mlm_probability=1", "data.mlm_probability: 1.0 is out of range"),
    ("data.noise_density=1.5", "data.noise_density: 1.5 is out of range"),
    ("data.mean_noise_span_length=0.5", "data.mean_noise_span_length: 0.5 is below the "
                                        "minimum 1.0"),
    ("data.target_len=-1", "data.target_len: -1 is below the minimum 0"),
    ("data.target_len=1.5", "data.target_len: expected an integer, got 1.5"),
])
def test_objective_config_values(override, expect):
    from jaxlm.config import load_config
    assert expect in _one_line_error(load_config, None, [override])
