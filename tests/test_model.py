"""The NNX model computes exactly the Llama math: checked against an independent float64 NumPy
implementation on random weights (norm scales randomised too, so nothing hides behind ones)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models.llama.config import LlamaConfig
from jaxlm.models.registry import build_model
from jaxlm.nn.attend import MaskSpec, attend


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(half) / half)
    ang = pos[..., None] * inv  # [B, S, half]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(q, k, v, seg):
    B, S, H, K = q.shape
    G = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)  # query head h reads kv head g
            logits = q[b, :, h] @ k[b, :, g].T / np.sqrt(K)
            allowed = np.tril(np.ones((S, S), bool))
            if seg is not None:
                allowed &= seg[b][:, None] == seg[b][None, :]
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


def np_forward(p, cfg, tokens, pos, seg):
    x = p["embed"][tokens]
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a: a[i], p["layers"]) if cfg.scan_layers else p["layers"][i]
        h = np_rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
        a = lp["attn"]
        q = np_rope(np.einsum("bsd,dhk->bshk", h, a["wq"]), pos, cfg.rope_theta)
        k = np_rope(np.einsum("bsd,dgk->bsgk", h, a["wk"]), pos, cfg.rope_theta)
        v = np.einsum("bsd,dgk->bsgk", h, a["wv"])
        x = x + np.einsum("bshk,hkd->bsd", np_attention(q, k, v, seg), a["wo"])
        h = np_rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        m = lp["mlp"]
        gate = h @ m["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ m["w_up"])) @ m["w_down"]
    x = np_rms(x, p["final_norm"]["scale"], cfg.norm_eps)
    return x @ (p["embed"].T if cfg.tie_embeddings else p["head"])


def random_params(model, seed):
    """Replace every parameter (norm scales included) with fresh random values."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    rng = np.random.default_rng(seed)
    new = [rng.normal(0, 0.3 if l.ndim > 1 else 1.0, l.shape).astype(np.float32) + (l.ndim == 1)
           for l in leaves]
    return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("scan,tie,kv", [(True, False, 2), (False, True, 4), (True, False, 1)])
def test_forward_matches_numpy_reference(scan, tie, kv):
    cfg = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv,
                      ffn_dim=48, scan_layers=scan, tie_embeddings=tie, rope_theta=500.0)
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    params = random_params(model, seed=scan * 10 + kv)
    rng = np.random.default_rng(1)
    B, S = 2, 12
    tokens = rng.integers(0, 64, (B, S))
    seg = np.array([[1] * 5 + [2] * 7, [1] * 12])
    pos = np.array([list(range(5)) + list(range(7)), list(range(3, 15))])
    got = nnx.merge(graphdef, params)(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = np_forward(params64, cfg, tokens, pos.astype(np.float64), seg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_segments_isolate_documents():
    """Changing a token of document 1 must not change any logit of document 2 in the same row."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    model = build_model(cfg, nnx.Rngs(3))
    seg = jnp.array([[1] * 6 + [2] * 6])
    pos = jnp.array([list(range(6)) * 2])
    a = jnp.arange(12)[None] % 64
    b = a.at[0, 2].set(63)
    la, lb = model(a, pos, seg), model(b, pos, seg)
    assert not np.allclose(la[0, 2:6], lb[0, 2:6])   # doc 1 after the change does change
    np.testing.assert_array_equal(np.asarray(la[0, 6:]), np.asarray(lb[0, 6:]))
    # and document 2 sees the same logits as if it stood alone at the start of a row
    alone = model(a[:, 6:], pos[:, 6:], seg[:, 6:])
    np.testing.assert_allclose(np.asarray(la[0, 6:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_scan_and_loop_give_same_function():
    base = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=48)
    scanned = build_model(LlamaConfig(**base, scan_layers=True), nnx.Rngs(0))
    looped = build_model(LlamaConfig(**base, scan_layers=False), nnx.Rngs(0))
    p = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    looped_p = dict(p, layers={i: jax.tree.map(lambda a: a[i], p["layers"]) for i in range(3)})
    nnx.update(looped, looped_p)
    tokens = jnp.arange(20).reshape(2, 10) % 64
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(looped(tokens)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_does_not_change_gradients(remat):
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    tokens = jnp.arange(24).reshape(2, 12) % 64

    def grads(cfg):
        model = build_model(cfg, nnx.Rngs(0))
        gd, p = nnx.split(model, nnx.Param)
        return jax.grad(lambda p: nnx.merge(gd, p)(tokens).astype(jnp.float32).std())(p)

    g0 = nnx.to_pure_dict(grads(LlamaConfig(**base)))
    g1 = nnx.to_pure_dict(grads(LlamaConfig(**base, remat=remat)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_close_to_fp32():
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    tokens = jnp.arange(24).reshape(2, 12) % 64
    f32 = build_model(LlamaConfig(**base), nnx.Rngs(0))(tokens)
    bf16 = build_model(LlamaConfig(**base, dtype="bfloat16"), nnx.Rngs(0))(tokens)
    assert bf16.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(bf16, np.float32) - f32) / np.linalg.norm(f32)
    assert 1e-5 < err < 3e-2  # bf16 differs (it really ran in bf16) but stays close


def test_attention_dispatch_rejects_unknown_impl():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attend(q, q, q, MaskSpec(), impl="flash")


def test_remat_really_saves_activation_memory():
    """The compiled train step's temporaries shrink with remat (rolled scan: on CPU, XLA's
    scheduler hoists an unrolled stack's recomputation, so the unrolled layouts are measured on
    the GPU by benchmarks/memory_fit.py instead)."""
    layout = {"scan_layers": True, "scan_unroll": 1}

    from helpers import tiny_config
    from jaxlm.config import MESH_AXES
    from jaxlm.data import FIELDS, field_specs
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import abstract_batch, build_step_fns

    def temp_bytes(remat):
        over = [f"model.{k}={str(v).lower()}" for k, v in layout.items()]
        cfg = tiny_config(*over, f"model.remat={remat}", "model.num_layers=4",
                          "data.seq_len=128", "model.d_model=64", "model.ffn_dim=256")
        mesh = make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])
        fns = build_step_fns(cfg, mesh)
        lowered = fns.train_step.lower(fns.abstract_state,
                                       abstract_batch(cfg, fns.batch_sharding,
                                                      field_specs(FIELDS, cfg.data.seq_len)))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    none, dots, full = temp_bytes("none"), temp_bytes("save_dots"), temp_bytes("full")
    assert full < 0.75 * none, (none, dots, full)
    assert dots < none, (none, dots, full)


def test_gpu_steps_of_dense_bf16_models_leave_gemms_to_cublas():
    """On a GPU the training and eval steps of a dense bf16 model compile without Triton GEMMs
    (their autotuning cost ~4 s of the 1B step's compile, and cuBLAS won it); fp8 and MoE
    models, and every CPU step, keep XLA's defaults."""
    from types import SimpleNamespace

    from helpers import family_config, tiny_config
    from jaxlm.config import MESH_AXES
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import compiler_options

    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]))
    assert compiler_options(tiny_config(), gpu) == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options(family_config("gpt2"), gpu) == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options(tiny_config("model.matmul_precision=fp8"), gpu) is None
    assert compiler_options(family_config("deepseek"), gpu) is None
    cpu = make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])
    assert compiler_options(tiny_config(), cpu) is None
