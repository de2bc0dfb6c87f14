"""The model families beside Llama: each forward against a float64 NumPy implementation of the
same math on random weights (GPT-2's learned positions and biases, BERT's post-norm and MLM head,
T5's bucketed relative bias and cross-attention, DeepSeek's latent attention with decoupled RoPE
and its grouped, bias-steered MoE routing), and their FLOPs formulas by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from helpers import family_config
from jaxlm.models.registry import build_model
from jaxlm.nn.moe import SelectionBias
from test_model import np_rms, np_rope, random_params
from test_nn import np_attend

B, S = 2, 12
SEG = np.array([[1] * 5 + [2] * 7, [1] * 12])
POS = np.array([list(range(5)) + list(range(7)), list(range(12))])


def np_ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def silu(x):
    return x / (1 + np.exp(-x))


def allowed(causal, seg_q, seg_k=None):
    seg_k = seg_q if seg_k is None else seg_k
    ok = seg_q[:, :, None] == seg_k[:, None, :]
    if causal:
        ok = ok & np.tril(np.ones(ok.shape[1:], bool))[None]
    return ok


def mha(a, xq, xkv, ok, scale=None, bias=None, rope=None):
    """Attention with q/k/v/o projections (+ biases where the layer has them)."""
    q = np.einsum("bsd,dhk->bshk", xq, a["wq"]) + a.get("b_q", 0)
    k = np.einsum("bsd,dgk->bsgk", xkv, a["wk"]) + a.get("b_k", 0)
    v = np.einsum("bsd,dgk->bsgk", xkv, a["wv"]) + a.get("b_v", 0)
    if rope is not None:
        q, k = np_rope(q, *rope), np_rope(k, *rope)
    out = np_attend_scaled(q, k, v, ok, scale, bias)
    return np.einsum("bshk,hkd->bsd", out, a["wo"]) + a.get("b_o", 0)


def np_attend_scaled(q, k, v, ok, scale=None, bias=None):
    if scale is None and bias is None:
        return np_attend(q, k, v, ok)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    # np_attend divides by sqrt(K): undo it through q, and add the bias through an extra column
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    H, G = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        for h in range(H):
            g = h // (H // G)
            logits = q[b, :, h] @ k[b, :, g].T * scale
            if bias is not None:
                logits = logits + bias[0, h]
            logits = np.where(ok[b], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


def layers(p, cfg_layers, key="layers"):
    stacked = p[key]
    return [jax.tree.map(lambda a: a[i], stacked) for i in range(cfg_layers)]


def build(family, *overrides, seed=0):
    cfg = family_config(family, *overrides).model
    model = build_model(cfg, nnx.Rngs(0))
    params = random_params(model, seed)
    nnx.update(model, params)
    return cfg, model, jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def tokens(vocab, seed=1, shape=(B, S)):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def check(got, want):
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=3e-4, atol=3e-4)


# ---------------------------------------------------------------- GPT-2

def test_gpt2_forward_matches_numpy():
    cfg, model, p = build("gpt2")
    t = tokens(cfg.vocab_size)
    x = p["embed"][t] + p["positions"][POS]
    ok = allowed(True, SEG)
    for lp in layers(p, cfg.num_layers):
        h = np_ln(x, lp["attn_norm"], cfg.norm_eps)
        x = x + mha(lp["attn"], h, h, ok)
        m, h = lp["mlp"], np_ln(x, lp["mlp_norm"], cfg.norm_eps)
        x = x + gelu_tanh(h @ m["w_up"] + m["b_up"]) @ m["w_down"] + m["b_down"]
    want = np_ln(x, p["final_norm"], cfg.norm_eps) @ p["embed"].T
    check(model(jnp.asarray(t), jnp.asarray(POS), jnp.asarray(SEG)), want)


# ---------------------------------------------------------------- BERT

@pytest.mark.parametrize("pre_norm", [False, True])
def test_bert_forward_matches_numpy(pre_norm):
    cfg, model, p = build("bert", f"model.pre_norm={str(pre_norm).lower()}")
    t = tokens(cfg.vocab_size)
    eps = cfg.norm_eps
    x = np_ln(p["embed"][t] + p["positions"][POS] + p["token_types"][0], p["embed_norm"], eps)
    ok = allowed(False, SEG)
    for lp in layers(p, cfg.num_layers):
        m = lp["mlp"]
        mlp = lambda h: gelu_erf(h @ m["w_up"] + m["b_up"]) @ m["w_down"] + m["b_down"]  # noqa
        if pre_norm:
            h = np_ln(x, lp["attn_norm"], eps)
            x = x + mha(lp["attn"], h, h, ok)
            x = x + mlp(np_ln(x, lp["mlp_norm"], eps))
        else:
            x = np_ln(x + mha(lp["attn"], x, x, ok), lp["attn_norm"], eps)
            x = np_ln(x + mlp(x), lp["mlp_norm"], eps)
    if pre_norm:
        x = np_ln(x, p["final_norm"], eps)
    t_ = np_ln(gelu_erf(x @ p["mlm_w"] + p["mlm_b"]), p["mlm_norm"], eps)
    want = t_ @ p["embed"].T + p["b_vocab"]
    check(model(jnp.asarray(t), jnp.asarray(POS), jnp.asarray(SEG)), want)


# ---------------------------------------------------------------- T5

def np_bucket(rel, bidirectional, num_buckets, max_distance):
    """transformers' T5Attention._relative_position_bucket, in NumPy."""
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        large = max_exact + (np.log(rel / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return out + np.where(rel < max_exact, rel, large)


def test_t5_buckets_match_transformers_formula():
    from jaxlm.nn.relative_bias import relative_bucket
    rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), int)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 16)):
            got = np.asarray(relative_bucket(jnp.asarray(rel), bidirectional, nb, md))
            np.testing.assert_array_equal(got, np_bucket(rel, bidirectional, nb, md))
    # spot values of the standard table (32 buckets, 128): exact below 8, log up to 127
    got = np.asarray(relative_bucket(jnp.arange(-3, 4)[None], True, 32, 128))
    assert got.tolist() == [[3, 2, 1, 0, 17, 18, 19]]


@pytest.mark.parametrize("tie", [False, True])
def test_t5_forward_matches_numpy(tie):
    cfg, model, p = build("t5", f"model.tie_embeddings={str(tie).lower()}")
    T = 7
    src, tgt = tokens(cfg.vocab_size), tokens(cfg.vocab_size, seed=2, shape=(B, T))
    seg_t = np.array([[1] * 3 + [2] * 4, [1] * 7])
    eps, nb, md = cfg.norm_eps, cfg.relative_buckets, cfg.relative_max_distance

    def bias(table, n, bidirectional):
        rel = np.arange(n)[None, :] - np.arange(n)[:, None]
        return table[np_bucket(rel, bidirectional, nb, md)].transpose(2, 0, 1)[None]

    def ffn(m, h):
        return (gelu_tanh(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]

    x = p["embed"][src]
    enc_bias = bias(p["encoder_bias"]["table"], S, True)
    for lp in layers(p, cfg.num_layers, "encoder_layers"):
        h = np_rms(x, lp["attn_norm"]["scale"], eps)
        x = x + mha(lp["attn"], h, h, allowed(False, SEG), scale=1.0, bias=enc_bias)
        x = x + ffn(lp["mlp"], np_rms(x, lp["mlp_norm"]["scale"], eps))
    memory = np_rms(x, p["encoder_norm"]["scale"], eps)
    y = p["embed"][tgt]
    dec_bias = bias(p["decoder_bias"]["table"], T, False)
    for lp in layers(p, cfg.decoder_layers):
        h = np_rms(y, lp["attn_norm"]["scale"], eps)
        y = y + mha(lp["attn"], h, h, allowed(True, seg_t), scale=1.0, bias=dec_bias)
        h = np_rms(y, lp["cross_norm"]["scale"], eps)
        y = y + mha(lp["cross_attn"], h, memory, allowed(False, seg_t, SEG), scale=1.0)
        y = y + ffn(lp["mlp"], np_rms(y, lp["mlp_norm"]["scale"], eps))
    y = np_rms(y, p["final_norm"]["scale"], eps)
    want = y * cfg.d_model ** -0.5 @ p["embed"].T if tie else y @ p["head"]
    got = model(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(POS), jnp.asarray(SEG),
                jnp.asarray(np.array([[0, 1, 2, 0, 1, 2, 3], list(range(7))])),
                jnp.asarray(seg_t))
    check(got, want)


# ---------------------------------------------------------------- DeepSeek (MLA + MoE)

def np_mla(a, x, pos, ok, c):
    Kn, R, Kr = c.qk_nope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    if c.q_lora_rank:
        q = np.einsum("bsq,qhk->bshk", np_rms(x @ a["wq_a"], a["q_norm"]["scale"], c.norm_eps),
                      a["wq_b"])
    else:
        q = np.einsum("bsd,dhk->bshk", x, a["wq"])
    kv_a = x @ a["wkv_a"]
    latent = np_rms(kv_a[..., :R], a["kv_norm"]["scale"], c.norm_eps)
    k_rope = np_rope(kv_a[..., None, R:], pos, c.rope_theta)
    kv = np.einsum("bsr,rhn->bshn", latent, a["wkv_b"])
    k_nope, v = kv[..., :Kn], kv[..., Kn:]
    q = np.concatenate([q[..., :Kn], np_rope(q[..., Kn:], pos, c.rope_theta)], -1)
    k = np.concatenate([k_nope, np.broadcast_to(k_rope, k_nope.shape[:3] + (Kr,))], -1)
    out = np_attend_scaled(q, k, v, ok, scale=(Kn + Kr) ** -0.5)
    return np.einsum("bshv,hvd->bsd", out, a["wo"])


def np_swiglu(x, wg, wu, wd):
    return (silu(x @ wg) * (x @ wu)) @ wd


def np_moe(m, x, c, bias):
    """DeepSeek-V3 routing, token by token: sigmoid scores; the bias steers the pick (best
    groups by the sum of their two best biased scores, then top-k), the unbiased scores of the
    picks, normalised and scaled, weight the experts; plus the shared experts."""
    E, k = c.num_experts, c.experts_per_token
    xs = x.reshape(-1, x.shape[-1])
    y = np.zeros_like(xs)
    for t, xt in enumerate(xs):
        scores = 1 / (1 + np.exp(-(xt @ m["router"])))
        choice = scores + bias
        groups = choice.reshape(c.num_groups, -1)
        group_score = np.sort(groups, -1)[:, -2:].sum(-1)
        best = np.argsort(-group_score, kind="stable")[:c.groups_per_token]
        keep = np.repeat(np.isin(np.arange(c.num_groups), best), E // c.num_groups)
        top = np.argsort(-np.where(keep, choice, -np.inf), kind="stable")[:k]
        w = scores[top] / scores[top].sum() * c.routed_scale
        for wi, e in zip(w, top):
            y[t] += wi * np_swiglu(xt, m["w_gate"][e], m["w_up"][e], m["w_down"][e])
        s = m["shared"]
        y[t] += np_swiglu(xt, s["w_gate"], s["w_up"], s["w_down"])
    return y.reshape(x.shape)


def test_deepseek_forward_matches_numpy():
    cfg, model, p = build("deepseek")
    bias_E = np.random.default_rng(5).normal(0, 0.5, (cfg.num_units, cfg.num_experts))
    model.layers.moe.selection_bias[...] = jnp.asarray(bias_E, jnp.float32)
    t = tokens(cfg.vocab_size)
    x = p["embed"][t]
    ok = allowed(True, SEG)
    blocks = ([(lp, None) for lp in layers(p, cfg.num_dense_layers, "dense_layers")]
              + [(lp, bias_E[i]) for i, lp in enumerate(layers(p, cfg.num_units))])
    for lp, bias in blocks:
        x = x + np_mla(lp["attn"], np_rms(x, lp["attn_norm"]["scale"], cfg.norm_eps), POS, ok,
                       cfg)
        h = np_rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        if bias is None:
            m = lp["mlp"]
            x = x + np_swiglu(h, m["w_gate"], m["w_up"], m["w_down"])
        else:
            x = x + np_moe(lp["moe"], h, cfg, bias)
    want = np_rms(x, p["final_norm"]["scale"], cfg.norm_eps) @ p["head"]
    check(model(jnp.asarray(t), jnp.asarray(POS), jnp.asarray(SEG)), want)


def test_balancing_bias_moves_toward_uniform_load():
    """After each forward pass, every expert's selection bias moved by the rate: up where the
    expert got less than 1/E of the picks (made with the bias as it was), down where more."""
    from jaxlm.nn.moe import MoE, expert_load, route
    from test_moe import moe_config
    c = moe_config(router="sigmoid", num_experts=8, bias_update_rate=0.01, num_groups=2,
                   groups_per_token=2)
    layer = MoE(c, nnx.Rngs(0))
    x_BxSxD = jax.random.normal(jax.random.key(7), (2, 16, c.d_model))
    for _ in range(3):
        before = np.asarray(layer.selection_bias[...])
        layer(x_BxSxD)
        experts = route(x_BxSxD.reshape(32, -1), layer.router[...], c.experts_per_token,
                        "sigmoid", jnp.asarray(before), (2, 2))[1]
        load = np.asarray(expert_load(experts, c.num_experts))
        np.testing.assert_allclose(np.asarray(layer.selection_bias[...]) - before,
                                   0.01 * np.sign(1 / c.num_experts - load), atol=1e-7)
    assert isinstance(layer.selection_bias, SelectionBias)
    assert not isinstance(layer.selection_bias, nnx.Param)  # gradients never touch it


# ---------------------------------------------------------------- FLOPs by hand

def test_flops_per_token_by_hand():
    from jaxlm.config import load_config
    gpt2 = load_config(["configs/gpt2-small.yaml"]).model
    # 12 layers x (4 x 768^2 + 2 x 768 x 3072) = 84,934,656; head 768 x 50257 = 38,597,376
    assert gpt2.matmul_params() == 123_532_032
    assert gpt2.flops_per_token(1024) == 6 * 123_532_032 + 6 * 12 * 1024 * 768
    bert = load_config(["configs/bert-base.yaml"]).model
    # layers 84,934,656 + MLM transform 589,824 + decoder 768 x 30522 = 23,440,896
    assert bert.matmul_params() == 108_965_376
    assert bert.flops_per_token(512) == 6 * 108_965_376 + 12 * 12 * 512 * 768  # bidirectional
    t5 = load_config(["configs/t5-small.yaml"]).model
    w = 6 * 64
    enc = 8 * (4 * 512 * w + 3 * 512 * 1024) + 8 * 2 * 512 * w   # + decoder cross k, v
    dec = 8 * (6 * 512 * w + 3 * 512 * 1024) + 512 * 32128
    assert (t5.matmul_params(), t5.decoder_matmul_params()) == (enc, dec)
    original = load_config(["configs/t5-small.yaml"], ["model.gated_ffn=false",
                                                       "model.ffn_activation=relu"]).model
    # the original T5's MLP has two matrices, not three
    assert (original.matmul_params(), original.decoder_matmul_params()) == (
        enc - 8 * 512 * 1024, dec - 8 * 512 * 1024)
    want = (6 * enc + 12 * 8 * 512 * w
            + (6 * dec + 6 * 8 * 114 * w + 12 * 8 * 512 * w) * 114 / 512)
    assert t5.run_flops_per_token(load_config(["configs/t5-small.yaml"]).data) == pytest.approx(
        want, rel=1e-12)
    ds = load_config(["configs/deepseek-1b.yaml"]).model
    attn = (1024 * 384 + 384 * 16 * 192 + 1024 * (256 + 64) + 256 * 16 * (128 + 128)
            + 16 * 128 * 1024)
    moe = 1024 * 16 + 3 * 1024 * 512 * (4 + 1)
    assert ds.matmul_params() == 12 * attn + 3 * 1024 * 2816 + 11 * moe + 1024 * 32000
    assert ds.flops_per_token(2048) == (6 * ds.matmul_params()
                                        + 6 * 12 * 2048 * 16 * (192 + 128) / 2)
