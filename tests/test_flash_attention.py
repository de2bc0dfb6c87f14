"""Pallas flash attention (the blocked backend, run by the CPU interpreter) against the fp32
reference: outputs, lse and dq/dk/dv through one random cotangent on (out, lse), over causal and
not, GQA ratios 1/2/4/8, packed documents, sliding windows, padded lengths, head_dim 64/128,
fp32 and bf16; the gradient through lse alone; jit + remat; an 8-device shard_map; the block
bands the kernels skip with; lowering of the same kernels for Mosaic TPU; and the errors bad
input gets.

Every case draws its own inputs from a seed of its own. Each flash configuration compiles once
(the interpreter is slow to compile, quick to run), so cases are tiny and compiled functions are
shared."""
import functools
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kernels_pallas import blocked
from kernels_pallas.flash import (BlockSizes, Problem, flash_attention, flash_attention_with_lse,
                                  jax_has_mosaic_gpu_api, on_hopper)
from kernels_pallas.reference import attention_reference, visible_BxSxT

B32 = BlockSizes(32, 32, 32, 32)
# max |error| relative to max |reference|. Logits of size L carry fp32 rounding ~L * 6e-8 in
# both implementations, so a case with logits past 100 (to show no exp overflows) gets tol_scale.
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


class Case(NamedTuple):
    B: int
    S: int
    H: int
    G: int
    D: int
    causal: bool = True
    segments: bool = False
    window: int | None = None
    blocks: BlockSizes | None = B32
    dtype: str = "float32"
    sm_scale: float | None = None
    tol_scale: float = 1.0
    kv_segments: bool = False  # keys carry ids of their own (a block of a ring), not the queries'



CASES = {
    "mha_causal_qblock_ne_kvblock": Case(2, 128, 2, 2, 64, blocks=BlockSizes(32, 64, 64, 32)),
    "gqa2_noncausal_pad100_d128": Case(1, 100, 4, 2, 128, causal=False),
    "gqa4_causal_segments": Case(2, 96, 4, 1, 64, segments=True),
    "gqa8_causal_window_pad200": Case(1, 200, 8, 1, 64, window=48),
    "noncausal_window_segments_big_logits": Case(1, 160, 2, 1, 64, causal=False, segments=True,
                                                 window=40, sm_scale=2.0, tol_scale=4.0),
    "bf16_gqa2_segments_d128": Case(2, 128, 4, 2, 128, segments=True, blocks=BlockSizes(64, 64),
                                    dtype="bfloat16"),
    "bf16_default_blocks_pad72": Case(1, 72, 2, 1, 64, causal=False, blocks=None,
                                      dtype="bfloat16"),
    "fp16_gqa2_causal_window": Case(1, 96, 4, 2, 64, window=40, dtype="float16"),
    "bf16_d256_gqa2_causal_segments_pad130": Case(1, 130, 4, 2, 256, segments=True,
                                                  dtype="bfloat16"),
    "gqa2_noncausal_kv_segments_pad80": Case(2, 80, 4, 2, 64, causal=False, segments=True,
                                             kv_segments=True),
    "bf16_causal_kv_segments": Case(1, 128, 2, 1, 64, segments=True, kv_segments=True,
                                    blocks=BlockSizes(64, 64), dtype="bfloat16"),
}
HOPPER = on_hopper()


def inputs(case: Case, seed: int):
    """q, k, v, segment ids (several documents per row, or None) and cotangents for out, lse."""
    ks = jax.random.split(jax.random.key(seed), 6)
    dtype = jnp.dtype(case.dtype)
    q = 2 * jax.random.normal(ks[0], (case.B, case.S, case.H, case.D), dtype)  # peaky softmax
    k, v = (jax.random.normal(kk, (case.B, case.S, case.G, case.D), dtype) for kk in ks[1:3])
    seg = None
    if case.segments:  # ~5 documents per row, boundaries differing between rows
        seg = jnp.cumsum(jax.random.bernoulli(ks[3], 5 / case.S, (case.B, case.S)), axis=1)
        seg = seg.astype(jnp.int32) + 7
    if case.kv_segments:  # keys: a fifth of them moved to the next document
        moved = jax.random.bernoulli(ks[5], 0.2, seg.shape)
        seg = (seg, jnp.where(moved, seg + 1, seg))
    dout = jax.random.normal(ks[4], q.shape, dtype)
    dlse = jax.random.normal(ks[5], (case.B, case.H, case.S), jnp.float32)
    return q, k, v, seg, dout, dlse


def _segment_kwargs(seg):
    """segment_ids (and kv_segment_ids) from what `inputs` drew."""
    if isinstance(seg, tuple):
        return dict(segment_ids=seg[0], kv_segment_ids=seg[1])
    return dict(segment_ids=seg)


def with_grads(attn):
    """jit(q, k, v, seg, dout, dlse -> out, lse, dq, dk, dv)."""
    def run(q, k, v, seg, dout, dlse):
        (out, lse), vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return (out, lse, *vjp((dout, dlse)))
    return jax.jit(run)


def _kwargs(case):
    return dict(causal=case.causal, sliding_window=case.window, sm_scale=case.sm_scale)


@functools.cache
def flash_fn(case: Case, backend="interpret"):
    return with_grads(lambda q, k, v, seg: flash_attention_with_lse(
        q, k, v, block_sizes=case.blocks, backend=backend, **_segment_kwargs(seg),
        **_kwargs(case)))


@functools.cache
def reference_fn(case: Case):
    return with_grads(lambda q, k, v, seg: attention_reference(q, k, v, **_segment_kwargs(seg),
                                                               **_kwargs(case)))


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def assert_close(got, want, tol, names=("out", "lse", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        err = rel_err(g, w)
        assert err < tol, f"{name}: max error {err:.2e} (relative to max |ref|) >= {tol:.0e}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    case = CASES[name]
    args = inputs(case, seed=zlib.crc32(name.encode()))
    if case.kv_segments:  # every query sees some key: a row that sees none has no reference lse
        vis = visible_BxSxT(case.S, causal=case.causal, segment_ids_BxS=args[3][0],
                            kv_segment_ids_BxT=args[3][1])
        assert bool(jnp.all(vis.any(-1))) and not bool(jnp.all(args[3][0] == args[3][1]))
    assert_close(flash_fn(case)(*args), reference_fn(case)(*args),
                 TOL[case.dtype] * case.tol_scale)


@pytest.mark.skipif(not HOPPER, reason="the Mosaic GPU kernels need a Hopper GPU (sm90)")
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.dtype != "float32"])
def test_hopper_matches_reference(name):
    """The same 16-bit cases through kernels_pallas/hopper*.py (its own tile sizes)."""
    case = CASES[name]._replace(blocks=None)
    args = inputs(case, seed=zlib.crc32(name.encode()))
    assert_close(flash_fn(case, "mosaic_gpu")(*args), reference_fn(case)(*args),
                 TOL[case.dtype] * case.tol_scale)


def test_gradient_through_lse_alone():
    """loss = sum(lse * w): only delta's -dlse term carries it (out's cotangent is zero)."""
    case = CASES["gqa4_causal_segments"]
    q, k, v, seg, dout, w = inputs(case, seed=11)
    args = (q, k, v, seg, jnp.zeros_like(dout), w)
    got, want = flash_fn(case)(*args), reference_fn(case)(*args)
    assert min(float(jnp.max(jnp.abs(g))) for g in want[2:4]) > 1e-2  # the test has teeth
    assert_close(got[2:4], want[2:4], TOL["float32"], names=("dq", "dk"))
    assert float(jnp.max(jnp.abs(got[4]))) < 1e-6  # lse does not depend on v


def test_jit_and_remat():
    """grad of a jax.checkpoint-ed loss, under jit, equals the reference's gradients."""
    case = Case(1, 64, 4, 2, 64, segments=True)
    q, k, v, seg, dout, dlse = inputs(case, seed=21)

    def loss(attn):
        def f(q, k, v):
            out, lse = attn(q, k, v, segment_ids=seg, causal=True)
            return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse)
        return jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)))

    flash = functools.partial(flash_attention_with_lse, block_sizes=B32, backend="interpret")
    grad_fn = loss(flash)
    jaxpr = str(jax.make_jaxpr(grad_fn)(q, k, v))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    assert_close(grad_fn(q, k, v), loss(attention_reference)(q, k, v), TOL["float32"],
                 names=("dq", "dk", "dv"))


def test_shard_map_batch_and_heads_equals_unsharded():
    """Batch over 4 devices, heads over 2 (q heads and kv heads split alike, so each shard keeps
    whole GQA groups): forward and gradients equal the one-device call."""
    mesh = jax.make_mesh((4, 2), ("batch", "heads"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    case = Case(4, 64, 4, 2, 64, segments=True)
    q, k, v, seg, dout, _ = inputs(case, seed=31)

    def attn(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, block_sizes=B32, backend="interpret")

    qkv = P("batch", None, "heads", None)
    sharded = jax.shard_map(attn, mesh=mesh, in_specs=(qkv, qkv, qkv, P("batch", None)),
                            out_specs=qkv, check_vma=False)

    def fwd_bwd(fn):
        @jax.jit
        def run(q, k, v, seg):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
            return (out, *vjp(dout))
        return run

    got = fwd_bwd(sharded)(q, k, v, seg)
    want = fwd_bwd(attn)(q, k, v, seg)
    assert got[0].sharding.spec[2] == "heads"
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < 1e-6, name
    ref = attention_reference(q, k, v, segment_ids=seg)[0]
    assert rel_err(got[0], ref) < TOL["float32"]


@pytest.mark.parametrize("causal,window,bq,bk,S", [
    (True, None, 32, 64, 256), (False, 40, 32, 32, 192), (True, 48, 64, 32, 256),
    (False, None, 64, 32, 128), (True, 1, 32, 32, 128), (False, 100, 32, 64, 256)])
def test_block_bands_are_exactly_the_visible_blocks(causal, window, bq, bk, S):
    """The kv band of each q block (and the q band of each kv block) holds exactly the block
    pairs with some visible (query, key), and `_fully_visible` exactly those with no masked one."""
    problem = Problem(causal=causal, sm_scale=1.0, sliding_window=window, has_segments=False,
                      blocks=BlockSizes())
    vis_SxT = np.asarray(visible_BxSxT(S, causal=causal, sliding_window=window)[0])
    nq, nk = S // bq, S // bk
    tiles_QxKxBQxBK = vis_SxT.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
    any_QxK, all_QxK = tiles_QxKxBQxBK.any((2, 3)), tiles_QxKxBQxBK.all((2, 3))
    for i in range(nq):
        lo, hi = blocked._kv_band(problem, i, bq, bk, nk)
        assert list(np.flatnonzero(any_QxK[i])) == list(range(lo, hi + 1)), i
        for j in range(lo, hi + 1):
            assert blocked._fully_visible(problem, i, j, bq, bk) == all_QxK[i, j], (i, j)
    for j in range(nk):
        lo, hi = blocked._q_band(problem, j, bq, bk, nq)
        assert list(np.flatnonzero(any_QxK[:, j])) == list(range(lo, hi + 1)), j


def test_sliding_window_grid_walks_only_the_band():
    """S=1024 in 128-blocks with a causal window of 128: the kv grid axis is 2 steps, not 8."""
    q = jnp.zeros((1, 1024, 1, 64), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda q: flash_attention(q, q, q, sliding_window=128,
                                                     backend="interpret"))(q)
    assert [e.params["grid_mapping"].grid for e in all_eqns(jaxpr.jaxpr)
            if "grid_mapping" in e.params] == [(1, 1, 8, 2)]


def all_eqns(jaxpr):
    """The equations of a jaxpr and of every jaxpr nested in their params (jit, custom_vjp)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and inner is not jaxpr:
                yield from all_eqns(inner)


def test_block_sizes_and_padding_multiple():
    problem = functools.partial(Problem, causal=True, sm_scale=1.0, sliding_window=None,
                                has_segments=False, interpret=True)
    default = problem(blocks=BlockSizes())
    assert [blocked.seq_multiple(default, S) for S in (5, 72, 100, 128, 200)] == \
        [8, 128, 128, 128, 128]
    odd = problem(blocks=BlockSizes(block_q=48))
    assert blocked.seq_multiple(odd, 20) == 96  # lcm(48, default 32)
    assert blocked._tiles(odd, 96) == blocked._Tiles(48, 32, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        blocked.seq_multiple(problem(blocks=BlockSizes(block_kv=12)), 64)
    with pytest.raises(ValueError, match="not a multiple of block"):
        blocked.forward(*(jnp.zeros((1, 100, 1, 64)),) * 3, None, default)


def lower_for_tpu(S, H, G, D, dtype, segments=False, **kw):
    """The jit of forward + backward lowered to Mosaic for a TPU v5p without one: Pallas checks
    block shapes against TPU tiling here (Mosaic's own compile needs a TPU). Private API."""
    try:
        from jax._src.mesh import AbstractDevice
        v5p = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=v5p)
    except (ImportError, TypeError) as e:
        pytest.skip(f"no abstract TPU device in this jax: {e}")
    q = jax.ShapeDtypeStruct((2, S, H, D), dtype)
    k = jax.ShapeDtypeStruct((2, S, G, D), dtype)
    seg = jax.ShapeDtypeStruct((2, S), jnp.int32) if segments else None

    def loss(q, k, v, seg):
        out, lse = flash_attention_with_lse(q, k, v, segment_ids=seg, backend="mosaic_tpu", **kw)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg)
        return traced.lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("S,H,G,D,dtype,kw", [
    (1024, 4, 2, 128, jnp.bfloat16, dict(segments=True)),
    (1000, 8, 1, 64, jnp.float32, dict(causal=False, sliding_window=256)),
    (2048, 2, 2, 256, jnp.bfloat16, dict(block_sizes=BlockSizes(256, 512, 128, 256))),
    (100, 4, 2, 64, jnp.bfloat16, {}),
])
def test_lowers_to_mosaic_tpu(S, H, G, D, dtype, kw):
    """Forward, dq and dk/dv kernels: three Mosaic custom calls."""
    assert lower_for_tpu(S, H, G, D, dtype, **kw).count("tpu_custom_call") == 3


def test_tpu_kv_blocks_fill_the_lanes():
    with pytest.raises(ValueError, match="multiples of 128 or the whole padded sequence"):
        lower_for_tpu(1024, 2, 2, 64, jnp.bfloat16, block_sizes=BlockSizes(block_kv=64))


@pytest.mark.parametrize("D,G,kw", [
    (128, 2, dict(causal=True)),
    (64, 1, dict(causal=False, sliding_window=100, segments=True)),
    (256, 2, dict(causal=True, segments=True)),
    (256, 4, dict(causal=False, sliding_window=200)),
])
def test_hopper_kernels_lower_for_cuda(D, G, kw):
    """With jax >= 0.11 the Hopper kernels (forward, dQ, dK/dV) lower for CUDA without a GPU,
    which checks their shared-memory budget and layouts; older jax gets one clear error."""
    segments = kw.pop("segments", False)
    q = jax.ShapeDtypeStruct((1, 1000, 4, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, G, D), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1000), jnp.int32) if segments else None

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, segment_ids=seg, backend="mosaic_gpu", **kw)
        return jnp.sum(out.astype(jnp.float32))

    lower = lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    if not jax_has_mosaic_gpu_api():
        with pytest.raises(ValueError, match="mosaic_gpu \\(Hopper\\) kernels need jax"):
            lower()
    else:
        assert lower().count("mosaic_gpu") >= 3


@pytest.mark.parametrize("change,match", [
    (dict(q=(2, 64, 4)), "must be \\[batch, seq, heads, head_dim\\]"),
    (dict(q=(2, 64, 3, 64)), "multiple of kv heads"),
    (dict(q=(2, 64, 4, 96), k=(2, 64, 2, 96), v=(2, 64, 2, 96)), "head_dim must be"),
    (dict(k_dtype=jnp.bfloat16), "dtypes differ"),
    (dict(dtype=jnp.int32), "dtype int32 not supported"),
    (dict(segment_ids=(2, 63)), "segment_ids must be an integer \\[2, 64\\]"),
    (dict(segment_ids_dtype=jnp.float32), "segment_ids must be an integer"),
    (dict(segment_ids=(2, 64), kv_segment_ids=(2, 32)),
     "kv_segment_ids must be an integer \\[2, 64\\]"),
    (dict(kv_segment_ids=(2, 64)), "kv_segment_ids needs segment_ids"),
    (dict(sliding_window=0), "sliding_window must be a positive int"),
    (dict(block_sizes=BlockSizes(block_q=20)), "multiples of 8"),
])
def test_bad_input_raises_clear_value_error(change, match):
    dtype = change.get("dtype", jnp.float32)
    q = jnp.zeros(change.get("q", (2, 64, 4, 64)), dtype)
    k = jnp.zeros(change.get("k", (2, 64, 2, 64)), change.get("k_dtype", dtype))
    v = jnp.zeros(change.get("v", (2, 64, 2, 64)), dtype)
    seg = None
    if "segment_ids" in change or "segment_ids_dtype" in change:
        seg = jnp.zeros(change.get("segment_ids", (2, 64)), change.get("segment_ids_dtype",
                                                                        jnp.int32))
    kv_seg = (jnp.zeros(change["kv_segment_ids"], jnp.int32) if "kv_segment_ids" in change
              else None)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg,
                        sliding_window=change.get("sliding_window"),
                        block_sizes=change.get("block_sizes"), backend="interpret")
