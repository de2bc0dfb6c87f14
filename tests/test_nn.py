"""The shared layers' contracts: the block's post-norm and cross-attention slot against a float64
NumPy reference, the attention mask spec, and the KV cache: decoding token by token through a
family's stack (its layers a list, as decoding runs them; MoE groups; GQA and MQA; ragged rows)
gives the logits of the full forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.models.registry import build_model
from jaxlm.nn.attend import MaskSpec, attend
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import Block, BlockConfig, LayerInputs
from jaxlm.nn.mlp import MLPConfig
from test_model import np_rms, np_rope, random_params


def np_attend(q, k, v, allowed):
    """q [B,S,H,K], k/v [B,T,G,K], allowed [B,S,T] bool."""
    B, S, H, K = q.shape
    G = k.shape[2]
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            logits = np.where(allowed[b], q[b, :, h] @ k[b, :, g].T / np.sqrt(K), -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


def test_mask_spec_allows_what_it_says():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    ok = np.asarray(MaskSpec(causal=True, sliding_window=2, q_segment_ids=seg).allowed(5, 5))[0]
    want = np.zeros((5, 5), bool)
    for i in range(5):
        for j in range(5):
            want[i, j] = j <= i and i - j < 2 and seg[0, i] == seg[0, j]
    np.testing.assert_array_equal(ok, want)
    assert ok[4, 4] and not ok[4, 3]  # padding (segment 0) sees only padding: no empty row
    # queries 2..3 of a row whose cache holds 2 tokens: causal by absolute index
    ok = np.asarray(MaskSpec(q_offset=jnp.array([2])).allowed(2, 6))[0]
    np.testing.assert_array_equal(ok, np.arange(6)[None, :] <= np.array([[2], [3]]))


def test_block_post_norm_and_cross_attention_match_numpy():
    D, H, G, K, F = 16, 4, 2, 8, 24
    f32 = jnp.float32

    def attn(causal, rope):
        return AttentionConfig(D, H, G, K, rope_theta=rope, causal=causal, sliding_window=None,
                               impl="xla", std=0.3, out_std=0.3, dtype=f32, param_dtype=f32)
    c = BlockConfig(D, attn(True, 100.0), MLPConfig(D, F, 0.3, 0.3, f32, f32), 1e-6, f32,
                    post_norm=True, cross_attention=attn(False, None))
    block = Block(c, nnx.Rngs(0))
    params = random_params(block, seed=1)
    nnx.update(block, params)
    rng = np.random.default_rng(2)
    B, S, T = 2, 6, 5
    h = rng.normal(size=(B, S, D)).astype(np.float32)
    memory = rng.normal(size=(B, T, D)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2], [1] * 6])
    mem_seg = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 2], list(range(6))])
    got, aux, cache = block(jnp.asarray(h), LayerInputs(jnp.asarray(pos), jnp.asarray(seg),
                                                         jnp.asarray(memory),
                                                         jnp.asarray(mem_seg)))
    assert aux == {} and cache is None

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x, mem = h.astype(np.float64), memory.astype(np.float64)

    def project(a, xq, xkv, allowed, rope_pos=None):
        q = np.einsum("bsd,dhk->bshk", xq, a["wq"])
        k = np.einsum("bsd,dgk->bsgk", xkv, a["wk"])
        v = np.einsum("bsd,dgk->bsgk", xkv, a["wv"])
        if rope_pos is not None:
            q, k = np_rope(q, rope_pos, 100.0), np_rope(k, rope_pos, 100.0)
        return np.einsum("bshk,hkd->bsd", np_attend(q, k, v, allowed), a["wo"])

    causal = np.tril(np.ones((S, S), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    x = np_rms(x + project(p["attn"], x, x, causal, pos.astype(np.float64)),
               p["attn_norm"]["scale"], 1e-6)
    cross = seg[:, :, None] == mem_seg[:, None, :]
    x = np_rms(x + project(p["cross_attn"], x, mem, cross), p["cross_norm"]["scale"], 1e-6)
    m = p["mlp"]
    gate = x @ m["w_gate"]
    x = np_rms(x + (gate / (1 + np.exp(-gate)) * (x @ m["w_up"])) @ m["w_down"],
               p["mlp_norm"]["scale"], 1e-6)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def test_attend_refuses_what_a_kernel_cannot_do():
    q = jnp.zeros((1, 4, 2, 64))
    with pytest.raises(ValueError, match="impl=pallas takes neither a logit bias"):
        attend(q, q, q, MaskSpec(), bias=jnp.zeros((1, 2, 4, 4)), impl="pallas")
    with pytest.raises(ValueError, match="impl=cudnn has no query offset"):
        attend(q, q, q, MaskSpec(q_offset=jnp.zeros((1,), jnp.int32)), impl="cudnn")


# ---------------------------------------------------------------- KV cache through a family

DEEPSEEK = ["model.family=deepseek", "model.kv_lora_rank=12", "model.qk_nope_head_dim=8",
            "model.qk_rope_head_dim=4", "model.v_head_dim=6", "model.num_dense_layers=1",
            "model.num_experts=4", "model.experts_per_token=2", "model.expert_ffn_dim=16"]
DECODE_MODELS = {
    "llama-gqa": ["model.num_kv_heads=2"],
    "llama-mqa": ["model.num_kv_heads=1"],
    "mixtral-groups": ["model.family=mixtral", "model.num_layers=4", "model.moe_every=2",
                       "model.num_experts=4", "model.expert_ffn_dim=16"],
    # MLA's latent cache (up-projections absorbed), with low-rank queries and YaRN's logit
    # scale, then with queries straight from x
    "deepseek-qlora-yarn": [*DEEPSEEK, "model.q_lora_rank=16", "model.rope_scaling=yarn",
                            "model.rope_scaling_factor=4", "model.rope_original_max_positions=4",
                            "model.rope_mscale=1", "model.rope_mscale_all_dim=1"],
    "deepseek-no-qlora": [*DEEPSEEK, "model.q_lora_rank=0"],
}


@pytest.mark.parametrize("name", list(DECODE_MODELS))
def test_cached_decode_equals_full_forward(name):
    """Row 0 prefills 4 tokens, row 1 only 2 (its chunk padded with segment 0); then both decode
    5 more at their own positions, one or two per step. Every logit equals the full forward's
    over that row's real tokens. The layers are a list, as decoding runs them (a scanned stack
    refuses a cache)."""
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2",
                             "model.num_heads=4", "model.ffn_dim=48", "model.scan_layers=false",
                             *DECODE_MODELS[name]]).model
    scanned = build_model(dataclasses.replace(cfg, scan_layers=True), nnx.Rngs(0)).stack()
    with pytest.raises(ValueError, match="a scanned stack takes no KV cache"):
        scanned.empty_cache(2, 16)
    model = build_model(cfg, nnx.Rngs(0))
    nnx.update(model, random_params(model, seed=3))
    tokens = np.random.default_rng(4).integers(0, 64, (2, 9))
    prompt = [4, 2]
    full = [np.asarray(model(jnp.asarray(tokens[b:b + 1]))[0]) for b in range(2)]

    stack = model.stack()
    cache = stack.empty_cache(2, 16)
    chunk = tokens[:, :4].copy()
    chunk[1, 2:] = 0
    seg = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    pos = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    got = [[], []]

    def step(tok_BxS, pos_BxS, seg_BxS):
        nonlocal cache
        h, inputs = model.embed_tokens(jnp.asarray(tok_BxS), jnp.asarray(pos_BxS),
                                       jnp.asarray(seg_BxS))
        h, _, cache = stack(h, inputs, cache)
        return np.asarray(model.logits(h))

    logits = step(chunk, pos, seg)
    for b in range(2):
        got[b] += list(logits[b, :prompt[b]])
    t = 0
    for n in (1, 2, 1, 1):  # then chunks of n tokens: row b's next real ones
        pos = np.array([[prompt[b] + t + i for i in range(n)] for b in range(2)])
        logits = step(tokens[np.arange(2)[:, None], pos], pos, np.ones((2, n), int))
        for b in range(2):
            got[b] += list(logits[b])
        t += n
    for b in range(2):
        n = prompt[b] + 5
        np.testing.assert_allclose(np.stack(got[b]), full[b][:n], rtol=2e-4, atol=2e-4)


def test_project_merges_axes_contracted_together_into_one():
    """The output projection 'bshk,hkd->bsd' multiplies over one merged axis (XLA turned a
    one-token product over two contracted axes into an elementwise product the size of the
    weight on the GPU): same numbers, for a float weight and an int8 one."""
    from jaxlm.nn.param import Int8Weight, project
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8, 16)).astype(np.float32)
    want = np.einsum("bshk,hkd->bsd", x, w)
    y = project("bshk,hkd->bsd", jnp.asarray(x), nnx.Param(jnp.asarray(w)), jnp.float32)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda x, w: project("bshk,hkd->bsd", x, nnx.Param(w), jnp.float32))(x, w)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [len(e.params["dimension_numbers"][0][0]) for e in dots] == [1]
    q = np.round(w / np.abs(w).max() * 127).astype(np.int8)
    scale = np.full((1, 1, 16), np.abs(w).max() / 127, np.float32)
    y8 = project("bshk,hkd->bsd", jnp.asarray(x),
                 nnx.Param(Int8Weight(jnp.asarray(q), jnp.asarray(scale))), jnp.float32)
    np.testing.assert_allclose(y8, np.einsum("bshk,hkd->bsd", x, q * scale), rtol=1e-4, atol=1e-4)
