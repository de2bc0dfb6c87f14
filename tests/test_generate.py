"""Decoding through the training model's KV cache: every generated position's logits equal a
no-cache forward over the whole sequence (each decoder family, GQA/MQA, ragged rows, a
data x tensor mesh), seeds reproduce, stop tokens end rows, beam search finds the brute-force
best, speculative decoding with greedy settings is plain greedy, MLA caches only its latent, and
an int8 cache stays close to full precision."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.config_fields import ConfigError
from jaxlm.generate import cache as kv
from jaxlm.generate.beam import BeamConfig, beam_search
from jaxlm.generate.engine import Engine, Request
from jaxlm.generate.lm import LM
from jaxlm.generate.load import mesh_of
from jaxlm.generate.sampling import SamplingConfig
from jaxlm.generate.speculative import Speculator, lookup
from jaxlm.models.registry import build_model
from jaxlm.config_schema import MESH_AXES

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4"]
FAMILIES = {
    "llama-gqa": ["model.num_kv_heads=2", "model.ffn_dim=48"],
    "llama-mqa-loop": ["model.num_kv_heads=1", "model.ffn_dim=48", "model.scan_layers=false"],
    "gpt2": ["model.family=gpt2", "model.max_positions=64", "data.seq_len=64"],
    "mixtral": ["model.family=mixtral", "model.num_layers=4", "model.moe_every=2",
                "model.num_experts=4", "model.expert_ffn_dim=16", "model.ffn_dim=48"],
    "deepseek": ["model.family=deepseek", "model.q_lora_rank=16", "model.kv_lora_rank=16",
                 "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
                 "model.ffn_dim=48", "model.num_layers=3", "model.num_dense_layers=1",
                 "model.num_experts=4", "model.experts_per_token=2", "model.expert_ffn_dim=16",
                 "model.bias_update_rate=0.01"],
}
GREEDY = SamplingConfig(temperature=0.0, max_tokens=6)


def tiny_lm(name, seed=0, extra=(), **kw):
    """A model of the family with random (non-zero-init) weights, and its LM view."""
    cfg = load_config(None, SMALL + FAMILIES[name] + list(extra)).model
    model = build_model(cfg, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(
        rng.normal(0, 0.3, x.shape), x.dtype), params))
    return model, LM.of(cfg, nnx.to_pure_dict(nnx.state(model)), **kw)


def decode_logits(engine, requests, steps, max_len=None):
    """Per real row: the logits each generated token was drawn from, and the tokens."""
    d, n = engine.prefill(requests, max_len)
    logits = [np.asarray(d.logits_BxV)]
    for _ in range(steps - 1):
        d = engine.step(d)
        logits.append(np.asarray(d.logits_BxV))
    tokens = np.asarray(d.tokens_BxN)
    return [(np.stack([lg[b] for lg in logits]), tokens[b, :steps]) for b in range(n)]


PROMPTS = [[5, 9, 2, 33, 17, 8, 1], [40, 3], [11, 12, 13, 14]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_decode_equals_full_forward(name):
    """Ragged prompts (7, 2, 4 tokens) decode 6 greedy tokens each; the logits of every
    generated position equal the full no-cache forward over prompt + output, and the LM's
    unscanned layers (split out of the scanned stack) compute what the trained model does."""
    model, lm = tiny_lm(name)
    assert not lm.cfg.scan_layers
    steps = 6
    got = decode_logits(Engine(lm), [Request(p, GREEDY) for p in PROMPTS], steps)
    seqs = [p + t.tolist() for p, (_, t) in zip(PROMPTS, got)]
    full_BxSxV = full_forward(lm, seqs)
    np.testing.assert_allclose(full_BxSxV, full_forward(lm, seqs, trained=model), rtol=1e-5,
                               atol=1e-5)
    for b, (prompt, (logits_NxV, tokens)) in enumerate(zip(PROMPTS, got)):
        full = full_BxSxV[b, len(prompt) - 1:len(seqs[b]) - 1]
        np.testing.assert_allclose(logits_NxV, full, rtol=2e-4, atol=2e-4)
        assert (np.argmax(full, -1) == tokens).all()


@pytest.mark.parametrize("kv_splits", [None, 2])
def test_decode_through_the_paged_kernel_equals_full_forward(monkeypatch, kv_splits):
    """attention_impl=pallas: the dense cache is read as pages by the paged-attention kernel
    (interpreted here), prefill and decode; every generated position's logits equal the XLA
    full forward's, and the kernel really ran. kv_splits=2: a 3-page cache whose longest row
    fills two pages, its keys shared out between two programs (flash-decoding). None: the
    automatic choice, 1 off a GPU."""
    import jaxlm.nn.attend as attend_mod
    import kernels_pallas.paged as paged_mod
    calls = []
    real = paged_mod.paged_attention
    monkeypatch.setattr(paged_mod, "paged_attention",
                        lambda *a, **kw: calls.append(kw["kv_splits"]) or real(*a, **kw))
    monkeypatch.setattr("jaxlm.nn.paged_cache.paged_attention", paged_mod.paged_attention)
    _, lm = tiny_lm("llama-gqa", extra=["model.d_model=64"])  # head dim 16: the kernel's least
    kernel_lm = LM.of(dataclasses.replace(lm.cfg, attention_impl="pallas"), lm.state,
                      kv_splits=kv_splits)
    prompts, max_len = PROMPTS, None
    if kv_splits:
        prompts = PROMPTS + [[(7 * i) % 60 + 1 for i in range(67)]]
        max_len = 3 * attend_mod.CACHE_PAGE
    got = decode_logits(Engine(kernel_lm), [Request(p, GREEDY) for p in prompts], 4, max_len)
    assert calls and set(calls) == {kv_splits or 1}
    seqs = [p + t.tolist() for p, (_, t) in zip(prompts, got)]
    full_BxSxV = full_forward(lm, seqs)
    for b, (prompt, (logits_NxV, tokens)) in enumerate(zip(prompts, got)):
        full = full_BxSxV[b, len(prompt) - 1:len(seqs[b]) - 1]
        np.testing.assert_allclose(logits_NxV, full, rtol=2e-4, atol=2e-4)


def full_forward(lm, seqs, trained=None):
    """The no-cache forward of the training model over right-padded rows (padding in segment
    0), from the LM's own state (a forward pass may update model state: MoE's bias), or of the
    `trained` nnx model itself (scanned, as it trained)."""
    graphdef, state = (lm.graphdef, lm.state) if trained is None else nnx.split(trained)
    S = max(map(len, seqs))
    tokens = np.zeros((len(seqs), S), np.int32)
    seg = np.zeros((len(seqs), S), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)], seg[b, :len(s)] = s, 1
    return np.asarray(jax.jit(lambda st, t, g: nnx.merge(graphdef, st)(t, segment_ids_BxS=g))(
        state, tokens, seg))


@pytest.mark.parametrize("name,cache_dtype", [("llama-gqa", None), ("deepseek", "int8")])
def test_mesh_decode_equals_one_device_and_cache_is_sharded(name, cache_dtype):
    """data=2 x tensor=2: the cache's rows are split over data and its kv heads over tensor (MLA's
    one latent head, shared by all heads, stays whole), and the tokens and logits equal one
    device's."""
    model, lm1 = tiny_lm(name)
    lm1 = LM.of(lm1.cfg, lm1.state, cache_dtype=cache_dtype)
    sizes = dict.fromkeys(MESH_AXES, 1) | {"data": 2, "tensor": 2}
    lm4 = LM.of(lm1.cfg, lm1.state, mesh=mesh_of(sizes), cache_dtype=cache_dtype)
    reqs = [Request(p, GREEDY) for p in PROMPTS] + [Request([7], GREEDY)]
    one = decode_logits(Engine(lm1), reqs, 4)
    engine = Engine(lm4)
    d, _ = engine.prefill(reqs)
    for c in jax.tree.leaves(d.cache, is_leaf=kv.is_cache):
        k = c.k_BxTxGxK
        G, local_G = k.shape[2], k.addressable_shards[0].data.shape[2]
        assert k.sharding.spec[0] == "data" and local_G == (G // 2 if G > 1 else 1)
    four = decode_logits(engine, reqs, 4)
    for (l1, t1), (l4, t4) in zip(one, four):
        np.testing.assert_allclose(l1, l4, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(t1, t4)


def test_seeds_reproduce_whatever_the_batch_and_stop_tokens_end_rows():
    _, lm = tiny_lm("llama-gqa")
    s = SamplingConfig(temperature=1.0, top_k=20, max_tokens=8, seed=7)
    engine = Engine(lm, min_rows=1)
    alone = engine.generate([Request([5, 9, 2], s)])[0].ids
    batched = engine.generate([Request([40, 3], SamplingConfig(max_tokens=8, seed=1)),
                               Request([5, 9, 2], s)])
    assert batched[1].ids == alone and len(alone) == 8
    other = engine.generate([Request([5, 9, 2], SamplingConfig(temperature=1.0, top_k=20,
                                                               max_tokens=8, seed=8))])[0].ids
    assert other != alone
    stop = alone[3]
    first = alone.index(stop)
    out = engine.generate([Request([5, 9, 2], SamplingConfig(
        temperature=1.0, top_k=20, max_tokens=8, seed=7, stop_ids=(stop,)))])[0]
    assert out.ids == alone[:first] and out.finish_reason == "stop"
    assert list(engine.stream(Request([5, 9, 2], s))) == alone
    # one request padded to two rows, the default (batch-1 decoding without vector x matrix
    # products)
    padded = Engine(lm)
    assert padded.prepare([Request([5, 9, 2], s)])[0]["tokens"].shape[0] == 2
    assert padded.generate([Request([5, 9, 2], s)])[0].ids == alone


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_decode_shape_options_refuse_what_is_not_a_positive_int(bad):
    """min_rows and kv_splits; and kv_splits' automatic choice fills ~128 programs, 1 to 4."""
    from jaxlm.nn.attend import auto_kv_splits
    assert [auto_kv_splits(rows, 16) for rows in (1, 2, 4, 8, 16)] == [4, 4, 2, 1, 1]
    assert auto_kv_splits(1, 1) == 4 and auto_kv_splits(64, 8) == 1
    _, lm = tiny_lm("llama-gqa")
    with pytest.raises(ConfigError, match=rf"^min_rows={bad!r}: expected a positive int"):
        Engine(lm, min_rows=bad)
    with pytest.raises(ConfigError, match=rf"^kv_splits={bad!r}: expected a positive int"):
        LM.of(lm.cfg, lm.state, kv_splits=bad)


def _seq_logp(model, prompt, seq):
    logp = jax.nn.log_softmax(model(jnp.asarray([prompt + seq]))[0].astype(jnp.float32))
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(seq)))


@pytest.mark.parametrize("lp", [1.0, 0.0])
def test_beam_search_equals_brute_force(lp):
    """Vocabulary 4, up to 3 tokens, width 64 (every candidate fits): the best hypothesis is
    the brute-force best over all sequences that end in EOS or reach the limit."""
    cfg = load_config(None, ["model.vocab_size=4", "model.d_model=16", "model.num_layers=1",
                             "model.num_heads=2", "model.num_kv_heads=1",
                             "model.ffn_dim=16"]).model
    model = build_model(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1.0, x.shape), x.dtype),
                                   nnx.state(model, nnx.Param)))
    lm = LM.of(cfg, nnx.to_pure_dict(nnx.state(model)))
    eos, L, prompt = 2, 3, [1, 3]
    cands = []
    for n in range(1, L + 1):
        for seq in itertools.product(range(4), repeat=n):
            if eos in seq[:-1] or (n < L and seq[-1] != eos):
                continue
            cands.append((_seq_logp(model, prompt, list(seq)) / n ** lp, list(seq)))
    best_score, best = max(cands)
    got = beam_search(lm, prompt, BeamConfig(64, lp), L, eos)
    assert got.ids == [t for t in best if t != eos]
    assert got.score == pytest.approx(best_score, rel=1e-4)
    assert got.finish_reason == ("stop" if best[-1] == eos else "length")
    small = beam_search(lm, prompt, BeamConfig(2, lp), L, eos)  # narrower: no better than best
    assert small.score <= best_score + 1e-5


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_greedy_speculative_equals_greedy(drafter):
    model, lm = tiny_lm("llama-gqa")
    s = SamplingConfig(temperature=0.0, max_tokens=12)
    prompt = [5, 9, 2, 33, 5, 9, 2]
    plain = Engine(lm).generate([Request(prompt, s)])[0].ids
    draft = tiny_lm("llama-mqa-loop", seed=5)[1] if drafter == "model" else None
    spec = Speculator(lm, 3, None, draft=draft, ngram=0 if draft else 2)
    got = spec.generate(Request(prompt, s))
    assert got.ids == plain and 0 <= got.accepted <= got.drafted
    self_spec = Speculator(lm, 3, None, draft=lm).generate(Request(prompt, s))
    assert self_spec.ids == plain and self_spec.acceptance == 1.0  # the target as its own draft
    # a round that emits a stop token or passes the token limit ends there, mid-round
    stop = SamplingConfig(temperature=0.0, max_tokens=12, stop_ids=(plain[6],))
    cut = spec.generate(Request(prompt, stop))
    assert cut.ids == plain[:plain.index(plain[6])] and cut.finish_reason == "stop"
    short = spec.generate(Request(prompt, SamplingConfig(temperature=0.0, max_tokens=5)))
    assert short.ids == plain[:5] and short.finish_reason == "length"


def lookup_reference(context: list[int], n: int, K: int) -> list[int]:
    """Prompt lookup in plain Python: the K tokens after the latest earlier occurrence of the
    context's last n tokens (shorter n-grams down to 1), the last repeated where the context
    runs out; the last token K times when nothing matches."""
    for m in range(min(n, len(context) - 1), 0, -1):
        tail = context[-m:]
        for start in range(len(context) - m - 1, -1, -1):
            if context[start:start + m] == tail:
                got = context[start + m:start + m + K]
                return got + [got[-1]] * (K - len(got))
    return [context[-1]] * K


def test_prompt_lookup_drafts():
    """The compiled lookup (over a fixed-size buffer, in the decode loop) against the Python
    reference: hand-picked cases, then 300 random contexts over 4 tokens (many matches)."""
    run = jax.jit(lookup, static_argnums=(2, 3))

    def drafts(context, n, K, size=24):
        buf = np.full((size,), 7, np.int32)  # unused slots hold a token that must not matter
        buf[:len(context)] = context
        return np.asarray(run(jnp.asarray(buf), jnp.int32(len(context)), n, K)).tolist()

    assert drafts([1, 2, 3, 9, 1, 2], 2, 3) == [3, 9, 1]
    assert drafts([1, 2, 3, 9, 1, 2], 2, 5) == [3, 9, 1, 2, 2]  # runs out: repeats its last
    assert drafts([4, 5, 6], 2, 2) == [6, 6]                    # no match: the last token
    rng = np.random.default_rng(0)
    for _ in range(300):
        context = rng.integers(0, 4, rng.integers(1, 16)).tolist()
        n, K = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        assert drafts(context, n, K) == lookup_reference(context, n, K), (context, n, K)


def test_bfloat16_cache_stays_close_to_float32():
    """--cache-dtype bfloat16: keys and values are stored in bf16; the logits move by bf16
    rounding only."""
    _, lm = tiny_lm("llama-gqa")
    lm16 = LM.of(lm.cfg, lm.state, cache_dtype="bfloat16")
    reqs = [Request(p, GREEDY) for p in PROMPTS]
    d, _ = Engine(lm16).prefill(reqs)
    assert all(c.k_BxTxGxK.dtype == jnp.bfloat16 for c in d.cache)
    for (l32, _), (l16, _) in zip(decode_logits(Engine(lm), reqs, 3),
                                  decode_logits(Engine(lm16), reqs, 3)):
        np.testing.assert_allclose(l16, l32, atol=0.05)


def test_mla_caches_only_the_latent():
    """DeepSeek's cache holds, per token and layer, the kv_lora_rank latent and the shared
    qk_rope_head_dim key (16 + 4 here), not per-head keys and values (4 heads x (12 + 8)); int8
    adds one float32 scale per token and layer."""
    _, lm = tiny_lm("deepseek")
    layers, B, T, L = lm.cfg.num_layers, 2, 8, 16 + 4
    for dtype, per_token in ((None, L * 4), ("int8", L + 4)):
        lm_d = LM.of(lm.cfg, lm.state, cache_dtype=dtype)
        shapes = jax.eval_shape(lambda s: lm_d.empty_cache(s, B, T), lm.state)
        assert kv.cache_bytes(shapes) == layers * B * T * per_token


# (seed, extra overrides): a dense Llama, and DeepSeek with every expert always routed (top-2 of
# 2), since int8 noise can flip a top-k expert choice and move the logits by a discrete jump
INT8_MODELS = {"llama-gqa": (2, []), "deepseek": (0, ["model.num_experts=2"])}


@pytest.mark.parametrize("name", list(INT8_MODELS))
def test_int8_cache_stays_close_to_float32(name):
    """--cache-dtype int8 (per-head absmax scales): greedy tokens equal float32's for 4 steps
    (the seeds give fp32 top-2 margins of at least 0.019, above the int8 error), and every
    logit moves by at most 4% of the largest |logit| (measured: under 2%)."""
    seed, extra = INT8_MODELS[name]
    _, lm = tiny_lm(name, seed, extra)
    lm8 = LM.of(lm.cfg, lm.state, cache_dtype="int8")
    with pytest.raises(ConfigError, match="cache dtype int32: expected one of"):
        LM.of(lm.cfg, lm.state, cache_dtype="int32")  # would truncate, not quantise
    reqs = [Request(p, GREEDY) for p in PROMPTS]
    for c in jax.tree.leaves(jax.eval_shape(lambda s: lm8.empty_cache(s, 1, 4), lm8.state),
                             is_leaf=kv.is_cache):
        assert c.k_BxTxGxK.dtype == jnp.int8 and c.k_scale_BxTxG.dtype == jnp.float32
    for (l32, t32), (l8, t8) in zip(decode_logits(Engine(lm), reqs, 4),
                                    decode_logits(Engine(lm8), reqs, 4)):
        np.testing.assert_array_equal(t8, t32)
        assert np.abs(l8 - l32).max() <= 0.04 * np.abs(l32).max()


def test_cache_bytes_report_matches_the_layouts():
    """benchmarks/cache_bytes.py reads shapes of the real caches; its figures are the layouts'
    arithmetic: layers x 2 (K, V) x kv heads x head dim x 2 bytes for Llama presets, layers x
    (kv_lora_rank + qk_rope_head_dim) x 2 for DeepSeek, and int8 one byte per element plus a
    4-byte scale per (token, layer, kv head, K or V)."""
    from benchmarks.cache_bytes import table
    got = {r["attention"]: (r["bfloat16"], r["int8"]) for r in table()}
    assert got == {"MHA": (16 * 2 * 16 * 128 * 2, 16 * 2 * 16 * (128 + 4)),
                   "GQA": (32 * 2 * 8 * 128 * 2, 32 * 2 * 8 * (128 + 4)),
                   "MQA": (16 * 2 * 1 * 128 * 2, 16 * 2 * 1 * (128 + 4)),
                   "MLA": (12 * (256 + 64) * 2, 12 * (256 + 64 + 4))}


def test_kv_heads_that_do_not_split_over_tensor_are_one_clear_error():
    """One kv head on tensor=2 (the default rules split kv heads over tensor): the weights'
    placement for decoding is refused naming the tensor, as training refuses it."""
    from helpers import tiny_config

    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.state import abstract_weights
    cfg = tiny_config("model.num_kv_heads=1")
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=2, sequence=1, expert=1, stage=1),
                     jax.devices()[:2])
    with pytest.raises(ConfigError, match=r"parameter layers.attn.wk with shape \(2, 32, 1, 8\)"
                                          r".*not divisible by mesh axes tensor=2"):
        abstract_weights(cfg.model, mesh, cfg.mesh.rules)
