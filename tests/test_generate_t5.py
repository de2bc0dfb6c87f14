"""T5 generation: the encoder runs once, the decoder decodes from the pad id with its
self-attention cache and the cross-attention keys/values cached at the prefill. Every generated
position's logits equal a no-cache forward of the trained model (ragged encoder inputs; its
stacks scanned, which decoding splits into lists, or not), beam search finds the brute-force best, and the CLI runs on a T5 run directory."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.generate.beam import BeamConfig, beam_search
from jaxlm.generate.engine import Engine, Request
from jaxlm.generate.lm import LM
from jaxlm.generate.sampling import SamplingConfig
from jaxlm.models.registry import build_model

T5 = ["model.family=t5", "model.vocab_size=64", "model.d_model=32", "model.num_layers=2",
      "model.num_heads=4", "model.head_dim=8", "model.ffn_dim=48", "model.relative_buckets=8",
      "model.relative_max_distance=16"]
START = 0  # pad: the decoder start id


def tiny_t5(overrides, seed=0, std=0.3):
    cfg = load_config(None, overrides).model
    model = build_model(cfg, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype),
                                   nnx.state(model, nnx.Param)))
    return model, LM.of(cfg, nnx.to_pure_dict(nnx.state(model)), decoder_start_id=START)


def t5_forward(model, prompts, decoder_rows):
    """No-cache logits [B, T, V] of an nnx T5 model: right-padded encoder inputs (padding in
    segment 0) and the decoder rows (start id + generated tokens, all real)."""
    S, T = max(map(len, prompts)), max(map(len, decoder_rows))
    enc, seg = np.zeros((len(prompts), S), np.int32), np.zeros((len(prompts), S), np.int32)
    for b, p in enumerate(prompts):
        enc[b, :len(p)], seg[b, :len(p)] = p, 1
    dec = np.asarray([r + [START] * (T - len(r)) for r in decoder_rows], np.int32)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, e, g, d: nnx.merge(graphdef, st)(
        e, d, segment_ids_BxS=g, decoder_segment_ids_BxT=jnp.ones_like(d)))
    return np.asarray(fn(state, enc, seg, dec), np.float32)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_t5_decode_equals_full_forward(scan):
    """Ragged encoder inputs (7, 2, 4 tokens), 6 greedy tokens each: every step's logits equal
    the no-cache forward's at that decoder position; the cross-attention caches are filled at
    the prefill (memory length = the prompt bucket) and carried unchanged."""
    model, lm = tiny_t5(T5 + [f"model.scan_layers={str(scan).lower()}"])
    prompts = [[5, 9, 2, 33, 17, 8, 1], [40, 3], [11, 12, 13, 14]]
    steps = 6
    engine = Engine(lm)
    d, n = engine.prefill([Request(p, SamplingConfig(temperature=0.0, max_tokens=steps))
                           for p in prompts])
    self_cache, memory_kv = d.cache[0]  # the first layer's
    assert self_cache.k_BxTxGxK.shape[-3] == 64 and memory_kv.k_BxTxGxK.shape[-3] == 16
    memory_before = np.asarray(memory_kv.k_BxTxGxK)
    logits = [np.asarray(d.logits_BxV)]
    for _ in range(steps - 1):
        d = engine.step(d)
        logits.append(np.asarray(d.logits_BxV))
    memory_after = d.cache[0][1].k_BxTxGxK
    np.testing.assert_array_equal(memory_before, np.asarray(memory_after))
    tokens = np.asarray(d.tokens_BxN)[:n, :steps]
    full = t5_forward(model, prompts, [[START] + t[:-1].tolist() for t in tokens])
    got_BxNxV = np.stack(logits, 1)[:n]
    np.testing.assert_allclose(got_BxNxV, full, rtol=2e-4, atol=2e-4)
    assert (np.argmax(full, -1) == tokens).all()
    if not scan:
        return
    # sampling runs through the same path; a row's output does not depend on its batch mates
    s = SamplingConfig(temperature=1.0, top_k=10, max_tokens=5, seed=3)
    alone = engine.generate([Request(prompts[0], s)])[0].ids
    both = engine.generate([Request(prompts[1], SamplingConfig(seed=9, max_tokens=5)),
                            Request(prompts[0], s)])[1].ids
    assert alone == both and len(alone) == 5


@pytest.mark.parametrize("lp", [1.0, 0.0])
def test_t5_beam_search_equals_brute_force(lp):
    """Vocabulary 4, up to 3 tokens, width 64: the best hypothesis is the brute-force best of
    log p(seq | encoder input) over every sequence that ends in EOS or reaches the limit."""
    model, lm = tiny_t5(T5[:1] + ["model.vocab_size=4", "model.d_model=16", "model.num_layers=1",
                              "model.num_heads=2", "model.head_dim=8", "model.ffn_dim=16"],
                    seed=1, std=1.0)
    eos, L, prompt = 2, 3, [1, 3, 3]
    seqs = [list(s) for n in range(1, L + 1) for s in itertools.product(range(4), repeat=n)
            if eos not in s[:-1] and (n == L or s[-1] == eos)]
    rows = [[START] + s + [START] * (L - len(s)) for s in seqs]
    logp = jax.nn.log_softmax(t5_forward(model, [prompt] * len(rows), rows), -1)
    cands = [(sum(float(logp[i, j, t]) for j, t in enumerate(s)) / len(s) ** lp, s)
             for i, s in enumerate(seqs)]
    best_score, best = max(cands)
    got = beam_search(lm, prompt, BeamConfig(64, lp), L, eos)
    assert got.ids == [t for t in best if t != eos]
    assert got.score == pytest.approx(best_score, rel=1e-4)
    assert got.finish_reason == ("stop" if best[-1] == eos else "length")


def test_cli_generates_from_a_t5_run(tmp_path, capsys):
    """A T5 run directory: JSONL greedy output (prompt = encoder input), beams with int8
    weights, and one line refusing speculative decoding."""
    from tests.test_generate_cli import gen, make_run
    make_run(tmp_path, ["model.family=t5", "model.vocab_size=512", "model.d_model=32",
                        "model.num_layers=1", "model.num_heads=2", "model.head_dim=8",
                        "model.ffn_dim=32", "data.seq_len=32", "checkpoint.async_save=false"])
    common = ["--run", tmp_path, "--prompt", "def f(x):", "--prompt", "ab", "--max-tokens", 4,
              "--temperature", 0]
    rc, out, err = gen(capsys, *common)
    records = [json.loads(line) for line in out.splitlines()]
    assert rc == 0, err
    assert [r["prompt"] for r in records] == ["def f(x):", "ab"]
    assert all(0 <= r["tokens"] <= 4 for r in records)
    rc, out, err = gen(capsys, *common, "--beams", 2, "--quantize", "int8", "--output",
                       tmp_path / "b.jsonl")
    assert rc == 0, err
    beams = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(beams) == 2
    rc, _, err = gen(capsys, *common, "--prompt-lookup", 2)
    assert rc == 2 and "encoder-decoder" in err
