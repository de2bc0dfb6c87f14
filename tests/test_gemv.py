"""The skinny-matmul (GEMV) kernel (kernels_pallas/gemv.py), interpreted (and compiled, on a
GPU: run this file with --noconftest there): against a float64 NumPy product for float and int8
weights, one to 16 rows, both tile products (broadcast and dot) and several K splits; its
Triton lowering for the 1B preset's decode shapes; one ValueError per bad input; and decoding
through it (`LM(gemv=...)`) giving the tokens and logits of XLA's dots."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gemv import GemvConfig, gemv

SMALL = GemvConfig(block_n=32, block_k=16)
BACKENDS = ["interpret"] + (["gpu"] if jax.default_backend() == "gpu" else [])


def inputs(M, K, N, w_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)).astype(np.float32)
    if w_dtype == "int8":
        w = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
        scale = rng.uniform(0.005, 0.02, size=N).astype(np.float32)
        want = (x.astype(np.float64) @ w.astype(np.float64)) * scale
        return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), jnp.asarray(scale), want
    w = rng.normal(size=(K, N)).astype(np.float32)
    x_j, w_j = jnp.asarray(x, w_dtype), jnp.asarray(w, w_dtype)
    want = np.asarray(x_j, np.float64) @ np.asarray(w_j, np.float64)
    return x_j, w_j, None, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,w_dtype,cfg", [
    (1, "float32", SMALL),                                    # broadcast, splits by default
    (2, "bfloat16", GemvConfig(block_n=32, block_k=16, splits=1)),
    (3, "float32", SMALL),                                    # dot (padded to 16 rows)
    (16, "bfloat16", GemvConfig(block_n=32, block_k=32, splits=2)),
    (1, "int8", GemvConfig(block_n=32, block_k=16, splits=4)),
    (5, "int8", GemvConfig(block_n=32, block_k=16, dot=False)),  # broadcast with 8 rows
    (1, "int8", GemvConfig(block_n=32, block_k=16, splits=1)),   # the kernel scales and casts
    (16, "float32", GemvConfig(block_n=32, block_k=16, splits=1)),
])
def test_gemv_matches_numpy(M, w_dtype, cfg, backend):
    K, N = 128, 96
    x, w, scale, want = inputs(M, K, N, w_dtype)
    y = gemv(x, w, scale, cfg=cfg, backend=backend)
    assert y.shape == (M, N) and y.dtype == x.dtype
    tol = 1e-5 if x.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), want,
                               atol=tol * np.abs(want).max(), rtol=0)
    y32 = gemv(x, w, scale, cfg=cfg, backend=backend, out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32


@pytest.mark.parametrize("M,K,N,w_dtype,cfg", [
    (1, 2048, 2048, jnp.bfloat16, GemvConfig()), (2, 2048, 5632, jnp.int8, GemvConfig()),
    (16, 5632, 2048, jnp.bfloat16, GemvConfig()),
    (1, 2048, 32000, jnp.int8, GemvConfig(splits=1))])
def test_gemv_lowers_to_triton(M, K, N, w_dtype, cfg):
    sd = jax.ShapeDtypeStruct
    args = [sd((M, K), jnp.bfloat16), sd((K, N), w_dtype)]
    if w_dtype == jnp.int8:
        args.append(sd((N,), jnp.float32))
    text = jax.jit(lambda *a: gemv(*a, cfg=cfg, backend="gpu")).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("change,match", [
    (dict(x=(17, 128)), r"needs 1..16 rows"),
    (dict(w=(128, 100)), r"N of block_n=32"),
    (dict(w=(64, 96)), r"expected x \[M, K\] and w \[K, N\]"),
    (dict(cfg=GemvConfig(block_n=48)), r"block_n=48 must be a power of two >= 16"),
    (dict(cfg=GemvConfig(block_n=32, block_k=16, splits=3)), r"splits=3 must divide K / "),
    (dict(int8=True), r"int8 w needs scale_N of shape \(96,\)"),
    (dict(scale=True), r"scale_N goes with int8 w only"),
    (dict(backend="cuda"), r"backend='cuda'"),
])
def test_gemv_bad_inputs_raise(change, match):
    x = jnp.zeros(change.get("x", (1, 128)), jnp.bfloat16)
    w = jnp.zeros(change.get("w", (128, 96)), jnp.int8 if change.get("int8") else jnp.bfloat16)
    scale = jnp.ones((96,)) if change.get("scale") else None
    with pytest.raises(ValueError, match=f"^gemv: .*{match}"):
        gemv(x, w, scale, cfg=change.get("cfg", SMALL), backend=change.get("backend"))


def test_decoding_through_the_kernel_equals_xla_dots(monkeypatch):
    """LM(gemv=...): every product of a decode step's rows by a weight that fits the blocks
    (the projections and the head; prefill's many rows stay XLA's) runs the kernel, and
    greedy decoding gives the same tokens and logits as XLA's dots. int8 weights: their scales
    are the one thing float weights would not exercise (the kernel's float path is above)."""
    import kernels_pallas.gemv as gemv_mod
    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.lm import LM
    from test_generate import GREEDY, PROMPTS, decode_logits, tiny_lm
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(a[1].shape) or
                        real(*a, **kw))
    _, lm = tiny_lm("llama-gqa", extra=["model.d_model=64", "model.ffn_dim=128"])
    plain = LM.of(lm.cfg, lm.state, quantize="int8")
    kernel = LM.of(lm.cfg, lm.state, quantize="int8", gemv=GemvConfig(block_n=16, block_k=16))
    # float32 XLA dots in full precision: on a GPU their default is TF32, the kernel's not
    with jax.default_matmul_precision("highest"):
        want = decode_logits(Engine(plain), [Request(p, GREEDY) for p in PROMPTS], 3)
        assert not calls
        got = decode_logits(Engine(kernel), [Request(p, GREEDY) for p in PROMPTS], 3)
    # per decode step: q, k, v, output, gate, up, down in each of 2 layers, and the head
    assert len(calls) >= 2 * 7 + 1 and (64, 64) in calls
    for (logits_w, tokens_w), (logits_g, tokens_g) in zip(want, got):
        np.testing.assert_array_equal(tokens_g, tokens_w)
        np.testing.assert_allclose(logits_g, logits_w, rtol=1e-4, atol=1e-4)
