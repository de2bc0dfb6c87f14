"""Ragged paged attention (kernels_pallas/paged.py): the Triton-style GPU kernel run by the
interpreter ("interpret") and the Mosaic-TPU kernel run by the interpreter ("interpret_tpu")
against the jnp reference, the reference against dense attention done by hand in numpy, garbage
in unused page slots / block-table entries, padding rows and idle slots, lowering of both kernels
for their real targets (Triton for CUDA, Mosaic for TPU), and one ValueError per bad input.

Every batch mixes what a serving step sees: a decode row (q_len 1), a prefill chunk against an
earlier prefix, an idle slot (q_len 0) and trailing padding rows, over shuffled, non-contiguous
pages (some shared between sequences) and kv lengths that are not page multiples. On a GPU the
"gpu" backend runs the same cases (run this file with --noconftest there)."""
import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged import paged_attention, paged_attention_reference

BACKENDS = ["interpret", "interpret_tpu"] + (["gpu"] if jax.default_backend() == "gpu" else [])
TOL = {"float32": 2e-5, "bfloat16": 2e-2}  # max |error| / max |reference|


class Case(NamedTuple):
    q_lens: tuple
    kv_lens: tuple
    page_size: int = 4
    G: int = 2
    H: int = 4
    K: int = 16
    V: int = 16
    dtype: str = "float32"
    causal: bool = True
    pad: int = 3           # padding rows after the last sequence's queries
    max_pages: int = 5     # block-table width
    sm_scale: float | None = None
    max_q_len: int | None = None
    pages_per_block: int | None = None
    shared_prefix: bool = False  # sequence 1 reuses sequence 0's first page (a forked prompt)
    window: int | None = None  # sliding window


CASES = {
    # decode row, 5-token chunk after an 8-token prefix, idle slot holding a cache, 3-token chunk
    "mixed_gqa2_causal_f32": Case((1, 5, 0, 3), (7, 13, 5, 3), shared_prefix=True),
    "mixed_gqa4_noncausal_bf16_v32": Case((1, 5, 0, 3), (9, 6, 2, 4), H=8, V=32,
                                          dtype="bfloat16", causal=False, max_q_len=5),
    "mha_causal_bf16_pages2_scale": Case((2, 0, 6), (11, 1, 17), G=2, H=2, dtype="bfloat16",
                                         pages_per_block=2, sm_scale=0.5),
    "gqa4_decode_only_page16": Case((1, 1, 1, 1), (1, 33, 16, 20), page_size=16, G=1, H=4,
                                    K=32, V=32, pad=2, max_pages=3, max_q_len=1,
                                    pages_per_block=2),
    "long_chunk_gqa2_noncausal_f32": Case((12, 1), (19, 2), page_size=8, causal=False,
                                          max_pages=3, pad=0, shared_prefix=True,
                                          pages_per_block=1),
    # a window of 5 keys: the 5-token chunk and the decode row skip their first pages
    "window5_mixed_gqa2_f32": Case((1, 5, 0, 3), (13, 17, 5, 3), window=5),
    "window3_noncausal_chunk_bf16": Case((6, 1), (9, 2), causal=False, window=3,
                                         dtype="bfloat16", pages_per_block=1),
    # 3 query heads per kv head: the GPU kernel pads them to a 4-row group
    "mixed_gqa3_causal_f32": Case((1, 5, 0, 3), (7, 13, 5, 3), H=6),
}


def for_backend(case: Case, backend: str) -> Case:
    """Triton tiles need power-of-two page_size >= 16: the gpu backend gets bigger pages."""
    return case._replace(page_size=max(16, case.page_size)) if backend == "gpu" else case


def make_inputs(case: Case, seed: int, garbage=False):
    """Random inputs: pages of all sequences drawn shuffled from a pool twice the size needed,
    unused table entries pointing at random pages (or, with garbage, at invalid page ids, and
    NaN in every page slot no sequence's kv_len covers)."""
    rng = np.random.default_rng(seed)
    S, B, M = len(case.q_lens), case.page_size, case.max_pages
    n_pages = [-(-n // B) for n in case.kv_lens]
    P = 2 * sum(n_pages) + 2
    perm = rng.permutation(P)
    bt = rng.integers(0, P, size=(S, M)).astype(np.int32)
    used = 0
    for s, n in enumerate(n_pages):
        bt[s, :n] = perm[used:used + n]
        used += n
    if case.shared_prefix:
        bt[1, 0] = bt[0, 0]
    cu = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    T = int(cu[-1]) + case.pad
    dt = jnp.dtype(case.dtype)
    q = rng.normal(size=(T, case.H, case.K)) * 2.0  # peaky softmax
    k = rng.normal(size=(P, B, case.G, case.K))
    v = rng.normal(size=(P, B, case.G, case.V))
    if garbage:
        live = np.zeros((P, B), bool)
        for s, n in enumerate(case.kv_lens):
            for i in range(n):
                live[bt[s, i // B], i % B] = True
        k[~live], v[~live], q[cu[-1]:] = np.nan, np.nan, np.nan
        for s, n in enumerate(n_pages):
            bt[s, n:] = rng.choice([-7, P, 10**6], size=M - n)
    return (jnp.asarray(q, dt), jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(bt),
            jnp.asarray(case.kv_lens, jnp.int32), jnp.asarray(cu))


def kwargs(case: Case):
    return dict(causal=case.causal, sm_scale=case.sm_scale, max_q_len=case.max_q_len,
                sliding_window=case.window)


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, backend):
    case = for_backend(CASES[name], backend)
    args = make_inputs(case, seed=len(name))
    out = paged_attention(*args, **kwargs(case), backend=backend,
                          pages_per_block=case.pages_per_block)
    want = paged_attention_reference(*args, **kwargs(case))
    T, H, _ = args[0].shape
    assert out.shape == (T, H, case.V) and out.dtype == args[0].dtype
    assert rel_err(out, want) < TOL[case.dtype]
    # padding rows come out exactly zero, real rows do not
    n_real = sum(case.q_lens)
    assert not np.any(np.asarray(out[n_real:], np.float32))
    assert np.all(np.any(np.asarray(out[:n_real], np.float32) != 0, axis=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_in_unused_slots_and_table_entries_is_ignored(backend):
    """NaN in every page slot past kv_len (same pages as real tokens, and whole unused pages), NaN
    query padding rows, and out-of-range block-table entries past each sequence's pages: same
    output, bit for bit, as clean inputs drawn from the same seed."""
    case = for_backend(CASES["mixed_gqa2_causal_f32"]._replace(shared_prefix=False), backend)
    clean = make_inputs(case, seed=5)
    dirty = make_inputs(case, seed=5, garbage=True)
    bt_dirty = np.asarray(dirty[3])
    assert np.isnan(np.asarray(dirty[1])).any() and ((bt_dirty < 0) | (bt_dirty >= 10**6)).any()
    for causal in (True, False):
        got = paged_attention(*dirty, causal=causal, backend=backend)
        want = paged_attention(*clean, causal=causal, backend=backend)
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert rel_err(got, paged_attention_reference(*dirty, causal=causal)) < TOL["float32"]


@pytest.mark.parametrize("name,splits", [("mixed_gqa2_causal_f32", 2),
                                         ("gqa4_decode_only_page16", 5),
                                         ("window5_mixed_gqa2_f32", 3)])
def test_key_splits_merge_to_one_programs_output(name, splits):
    """Flash-decoding: each block's pages shared among `splits` programs (more than some
    sequences have pages, so some splits see no key) and merged by log-sum-exp equal the
    one-program kernel, with NaN garbage in unused slots and table entries, int8 pages too."""
    case = CASES[name]
    for garbage in (False, True):
        args = make_inputs(case, seed=11, garbage=garbage)
        one = paged_attention(*args, **kwargs(case), backend="interpret")
        split = paged_attention(*args, **kwargs(case), backend="interpret", kv_splits=splits)
        assert split.dtype == one.dtype and np.isfinite(np.asarray(split)).all()
        np.testing.assert_allclose(np.asarray(split), np.asarray(one), rtol=1e-5, atol=1e-6)
    args, scales, floats = quantize_pages(make_inputs(case, seed=3))
    split = paged_attention(*args, **kwargs(case), **scales, backend="interpret",
                            kv_splits=splits)
    assert rel_err(split, paged_attention_reference(*floats, **kwargs(case))) < TOL[case.dtype]


def _pallas_aliases(jaxpr):
    """input_output_aliases of every pallas_call in a (closed) jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn.params["input_output_aliases"])
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                found += _pallas_aliases(inner)
    return found


@pytest.mark.parametrize("splits", [1, 3])
def test_constant_lengths_owning_every_row_skip_the_zero_fill(splits):
    """cu_q_lens as a NumPy constant that gives every row a sequence (the dense decode cache's
    layout): the kernel writes its outputs without aliasing zero buffers (a copy each per call)
    and gives what the traced cu_q_lens, zero-filled, gives."""
    case = CASES["mixed_gqa3_causal_f32"]._replace(pad=0)
    args = make_inputs(case, seed=2)
    cu = np.asarray(args[5])

    def run(cu_q_lens):
        return lambda *a: paged_attention(*a, cu_q_lens, **kwargs(case), backend="interpret",
                                          kv_splits=splits)
    assert _pallas_aliases(jax.make_jaxpr(run(cu))(*args[:5]).jaxpr) == [()]
    assert _pallas_aliases(jax.make_jaxpr(run(args[5]))(*args[:5]).jaxpr) != [()]
    got = run(cu)(*args[:5])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(run(args[5])(*args[:5])))
    assert rel_err(got, paged_attention_reference(*args, **kwargs(case))) < TOL[case.dtype]


def dense_numpy(q, k_pages, v_pages, bt, kv_lens, cu, causal, sm_scale, window=None):
    """Attention row by row in float64 from contiguous per-sequence K/V copied out of the pages."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    bt, kv_lens, cu = (np.asarray(x) for x in (bt, kv_lens, cu))
    T, H, _ = q.shape
    B, G = k_pages.shape[1], k_pages.shape[2]
    out = np.zeros((T, H, v_pages.shape[3]))
    for s in range(len(kv_lens)):
        n = kv_lens[s]
        k = np.stack([k_pages[bt[s, i // B], i % B] for i in range(n)])  # [n, G, K]
        v = np.stack([v_pages[bt[s, i // B], i % B] for i in range(n)])
        q_len = cu[s + 1] - cu[s]
        for j in range(q_len):
            pos = n - q_len + j
            hi = pos + 1 if causal else n
            lo = 0 if window is None else max(pos - window + 1, 0)
            hi = hi if window is None else min(hi, pos + window)
            for h in range(H):
                logits = k[lo:hi, h // (H // G)] @ q[cu[s] + j, h] * sm_scale
                w = np.exp(logits - logits.max())
                out[cu[s] + j, h] = (w / w.sum()) @ v[lo:hi, h // (H // G)]
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 4), (False, 3)])
def test_reference_matches_dense_numpy(causal, window):
    case = CASES["mixed_gqa2_causal_f32"]._replace(H=8, V=24)
    args = make_inputs(case, seed=11)
    want = dense_numpy(*args, causal=causal, sm_scale=case.K ** -0.5, window=window)
    got = paged_attention_reference(*args, causal=causal,  # sm_scale None: 1/sqrt(K)
                                    sliding_window=window)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def quantize_pages(args):
    """The inputs with int8 K/V pages (jaxlm's KV-cache rounding: one scale per stored vector)
    -> (int8 args, their scales, the float args those int8 values stand for)."""
    from jaxlm.nn.int8 import quantize
    q, k, v, *rest = args
    (kq, ks), (vq, vs) = quantize(k), quantize(v)
    deq = lambda x, s: (x.astype(jnp.float32) * s[..., None]).astype(q.dtype)  # noqa: E731
    return (q, kq, vq, *rest), dict(k_scales_PxBxG=ks, v_scales_PxBxG=vs), \
        (q, deq(kq, ks), deq(vq, vs), *rest)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "interpret_tpu"])
@pytest.mark.parametrize("name", ["mixed_gqa2_causal_f32", "mixed_gqa4_noncausal_bf16_v32"])
def test_int8_pages_attend_like_their_dequantised_values(name, backend):
    """int8 pages with per-vector scales, dequantised page by page inside the kernel, give the
    attention of the float values they stand for (and so does the reference)."""
    case = for_backend(CASES[name], backend)
    args, scales, floats = quantize_pages(make_inputs(case, seed=3))
    want = paged_attention_reference(*floats, **kwargs(case))
    out = paged_attention(*args, **kwargs(case), **scales, backend=backend)
    assert out.dtype == args[0].dtype and rel_err(out, want) < TOL[case.dtype]
    assert rel_err(paged_attention_reference(*args, **kwargs(case), **scales), want) < TOL[
        case.dtype]


# ---- lowering for the real targets (no device needed) ----

def _lower(backend, platform, K=128, page_size=16, dtype=jnp.bfloat16, int8=False, **kw):
    S, M, P, G, H, T = 8, 16, 64, 2, 8, 64
    sd = jax.ShapeDtypeStruct
    pages = jnp.int8 if int8 else dtype
    args = (sd((T, H, K), dtype), sd((P, page_size, G, K), pages),
            sd((P, page_size, G, K), pages), sd((S, M), jnp.int32), sd((S,), jnp.int32),
            sd((S + 1,), jnp.int32))
    if int8:
        kw = dict(kw, k_scales_PxBxG=sd((P, page_size, G), jnp.float32),
                  v_scales_PxBxG=sd((P, page_size, G), jnp.float32))
    ctx = contextlib.nullcontext()
    if platform == "tpu":  # Pallas checks TPU block shapes here; Mosaic's compile needs a TPU
        try:
            from jax._src.mesh import AbstractDevice
            v5p = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
            ctx = jax.sharding.use_abstract_mesh(
                jax.sharding.AbstractMesh((1,), ("x",), abstract_device=v5p))
        except (ImportError, TypeError, AttributeError) as e:
            pytest.skip(f"no abstract TPU device in this jax: {e}")
    with ctx:
        scales = {n: kw.pop(n) for n in ("k_scales_PxBxG", "v_scales_PxBxG") if n in kw}
        return jax.jit(lambda *a, **sc: paged_attention(*a, backend=backend, **kw, **sc)).trace(
            *args, **scales).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("kw", [dict(max_q_len=16, pages_per_block=2),
                                dict(max_q_len=1, causal=False), dict(max_q_len=1, int8=True),
                                dict(max_q_len=16, sliding_window=40),
                                dict(max_q_len=1, kv_splits=4, int8=True)])
def test_gpu_kernel_lowers_to_triton(kw):
    assert _lower("gpu", "cuda", **kw).count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("kw", [dict(max_q_len=16, pages_per_block=2),
                                dict(max_q_len=1, causal=False)])
def test_tpu_kernel_lowers_to_mosaic(kw):
    assert _lower("tpu", "tpu", **kw).count("tpu_custom_call") == 1


# ---- bad inputs ----

def _bad(name):
    """Valid tiny inputs with one thing broken; -> (args, extra kwargs)."""
    q, k, v, bt, kv, cu = make_inputs(Case((1, 2), (3, 4), pad=1, max_pages=2), seed=0)
    kw = {}
    if name == "q_rank":
        q = q[:, 0]
    elif name == "k_rank":
        k = k[0]
    elif name == "heads":
        q = jnp.concatenate([q, q[:, :1]], axis=1)
    elif name == "head_dim":
        q = q[..., :8]
    elif name == "v_pages":
        v = v[:-1]
    elif name == "page_size":
        v = v[:, :2]
    elif name == "kv_lens_len":
        kv = kv[:1]
    elif name == "cu_len":
        cu = cu[:-1]
    elif name == "bt_rows":
        bt = bt[:1]
    elif name == "bt_dtype":
        bt = bt.astype(jnp.uint32)
    elif name == "kv_lens_dtype":
        kv = kv.astype(jnp.float32)
    elif name == "dtype":
        k = k.astype(jnp.bfloat16)
    elif name == "backend":
        kw["backend"] = "cuda"
    elif name == "max_q_len":
        kw["max_q_len"] = 0
    elif name == "pages_per_block":
        kw["pages_per_block"] = 1.5
    elif name == "gpu_page_size":
        kw["backend"] = "gpu"
    elif name == "tpu_head_dim":
        kw["backend"] = "tpu"
    elif name == "window":
        kw["sliding_window"] = 0
    elif name == "kv_splits":
        kw["kv_splits"] = 0
    elif name == "kv_splits_tpu":
        kw.update(kv_splits=2, backend="interpret_tpu")
    elif name in ("int8_scales_shape", "int8_tpu", "int8_float_pages"):
        P, B, G = k.shape[:3]
        kw = dict(k_scales_PxBxG=jnp.ones((P, B, G)), v_scales_PxBxG=jnp.ones((P, B, G)))
        if name != "int8_float_pages":
            k, v = k.astype(jnp.int8), v.astype(jnp.int8)
        if name == "int8_scales_shape":
            kw["v_scales_PxBxG"] = jnp.ones((P, B))
        if name == "int8_tpu":
            kw["backend"] = "interpret_tpu"
    return (q, k, v, bt, kv, cu), kw


BAD_INPUTS = [
    ("q_rank", r"q must be rank 3 \[tokens, q_heads, head_dim\]"),
    ("k_rank", r"k_pages must be rank 4"),
    ("heads", r"q heads \(5\) must be a multiple of k_pages' kv heads \(2\)"),
    ("head_dim", r"k_pages head_dim \(16\) must match q's head_dim \(8\)"),
    ("v_pages", r"v_pages must be \[pages, page_size, kv_heads\]"),
    ("page_size", r"v_pages must be \[pages, page_size, kv_heads\]"),
    ("kv_lens_len", r"kv_lens must be \[2\]"),
    ("cu_len", r"cu_q_lens must be \[3\] \(sequences \+ 1\)"),
    ("bt_rows", r"kv_lens must be \[1\] \(one per block_tables row\)"),
    ("bt_dtype", r"block_tables must be int32; got uint32"),
    ("kv_lens_dtype", r"kv_lens must be int32; got float32"),
    ("dtype", r"q, k_pages, v_pages must share one of"),
    ("backend", r"backend='cuda'; expected one of"),
    ("max_q_len", r"max_q_len must be a positive int"),
    ("pages_per_block", r"pages_per_block must be a positive int"),
    ("gpu_page_size", r"the gpu \(Triton\) backend needs page_size a power of two >= 16; got 4"),
    ("tpu_head_dim", r"the tpu backend needs head_dim and v_head_dim multiples of 128"),
    ("window", r"sliding_window must be a positive int \(or None\); got 0"),
    ("int8_float_pages", r"with k_scales and v_scales, the pages must be int8 and q a float"),
    ("int8_scales_shape",
     r"v_scales must be float32 \[pages, page_size, kv_heads\] = \(6, 4, 2\)"),
    ("int8_tpu", r"int8 pages run on the gpu and interpret backends, not interpret_tpu"),
    ("kv_splits", r"kv_splits must be a positive int; got 0"),
    ("kv_splits_tpu", r"kv_splits > 1 runs on the gpu and interpret backends, not interpret_tpu"),
]


@pytest.mark.parametrize("name,match", BAD_INPUTS, ids=[n for n, _ in BAD_INPUTS])
def test_bad_inputs_raise(name, match):
    args, kw = _bad(name)
    with pytest.raises(ValueError, match=f"^paged_attention: {match}"):
        paged_attention(*args, **kw)
    if "backend" not in kw and name not in ("max_q_len", "pages_per_block", "window",
                                            "kv_splits"):
        with pytest.raises(ValueError, match=match):  # the reference checks its inputs too
            paged_attention_reference(*args, **kw)
