"""Skinny matmuls for decoding: y [M, N] = x [M, K] @ w [K, N] for a few rows M (one decode
step's tokens), w in a float dtype or int8 with one float32 scale per output column.

Why a kernel. At batch 1 a decode step is a chain of vector x matrix products whose cost is
reading the weights once. XLA's GPU compiler turns such products under 10M elements into a
multiply and a reduction (its DotStrengthReduction pass: the 1B preset's 2048 x 2048 output
projection took 16 us where its 8 MB need ~2), and multiplies int8 weights in a GEMM fusion
that ran slower than bf16's (21.7 against 16.3 us for the gate/up product on an H200), so int8
weights bought nothing at batch 1 (benchmarks/RESULTS.md).

Here each program streams [block_k, block_n] tiles of the weight down its share of K, converts
them in registers and accumulates x's rows against them in float32: for one or two rows as a
broadcast product summed over K, else as a dot with x padded to the 16 rows tl.dot wants. The
grid splits K as well as N (split-K), so a 2048-wide output still gives the GPU hundreds of
programs; each writes its partial product and XLA sums the splits, applies the int8 scales and
casts (with one split the kernel does that itself, and the product is one kernel).

Backends (`backend=None`: "gpu" on a GPU, else "interpret"): "gpu" lowers through Triton
(full-array refs in global memory, tiles loaded by dynamic slices); "interpret" runs the same
kernel body on any device (the CPU tests). Block sizes must divide K and N (`supported` says
whether a shape has any); defaults are unmeasured guesses, and benchmarks/gemv.py sweeps them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BACKENDS = ("gpu", "interpret")
MAX_ROWS = 16          # more rows than this is a GEMM's job
DOT_ROWS = 16          # a tl.dot's least rows: x is padded to this many for one
TARGET_PROGRAMS = 264  # two per SM of an H100/H200 (132 SMs)
MIN_K_STEPS = 4        # K blocks per program at least: the splits' partial sums cost traffic


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int = 256
    block_k: int = 32
    splits: int | None = None   # programs along K; None: enough for TARGET_PROGRAMS
    # the tile product as a tl.dot (x padded to 16 rows) or a broadcast product summed over K
    # (rows x block_k x block_n float32 values in registers); None: broadcast up to 2 rows
    dot: bool | None = None
    num_warps: int = 4
    num_stages: int = 2


def _fail(msg):
    raise ValueError(f"gemv: {msg}")


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def supported(M: int, K: int, N: int, cfg: GemvConfig = GemvConfig()) -> bool:
    """Whether the kernel takes this product: few rows, and the block sizes divide K and N."""
    return 1 <= M <= MAX_ROWS and K % cfg.block_k == 0 and N % cfg.block_n == 0


def _splits(cfg: GemvConfig, K: int, N: int) -> int:
    """K splits: the given count, or the least power of two giving TARGET_PROGRAMS programs,
    each left MIN_K_STEPS blocks of K or more."""
    k_blocks = K // cfg.block_k
    if cfg.splits is not None:
        if k_blocks % cfg.splits:
            _fail(f"splits={cfg.splits} must divide K / block_k = {k_blocks}")
        return cfg.splits
    splits = 1
    while ((N // cfg.block_n) * splits < TARGET_PROGRAMS and k_blocks % (2 * splits) == 0
           and k_blocks // (2 * splits) >= MIN_K_STEPS):
        splits *= 2
    return splits


def _kernel(x_ref, w_ref, *refs, block_n, block_k, k_steps, dot, final):
    """Program (n, s): output columns [n * block_n, +block_n), K rows of split s. refs: the
    int8 scales if any, then the output: with one split (`final`) the product itself, scaled
    and cast; else this split's float32 partial product."""
    o_ref, scale_ref = refs[-1], refs[0] if len(refs) == 2 else None
    n, s = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(n * block_n, block_n)
    k0 = s * k_steps * block_k

    def body(i, acc_RxN):
        ks = pl.ds(k0 + i * block_k, block_k)
        x_RxK = x_ref[:, ks]
        w_KxN = w_ref[ks, cols]
        if dot:  # int8 values are exact in x's 16-bit dtype
            return acc_RxN + lax.dot_general(
                x_RxK, w_KxN.astype(x_RxK.dtype), (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=lax.Precision.HIGHEST if x_RxK.dtype == jnp.float32 else None)
        prod_RxKxN = x_RxK.astype(jnp.float32)[:, :, None] * w_KxN.astype(jnp.float32)[None]
        return acc_RxN + jnp.sum(prod_RxKxN, axis=1)

    acc_RxN = lax.fori_loop(0, k_steps, body,
                            jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    if not final:
        o_ref[s, :, cols] = acc_RxN
        return
    if scale_ref is not None:
        acc_RxN = acc_RxN * scale_ref[cols][None, :]
    o_ref[:, cols] = acc_RxN.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "out_dtype"))
def _gemv(x_MxK, w_KxN, scale_N, *, cfg: GemvConfig, backend: str, out_dtype):
    M, K = x_MxK.shape
    N = w_KxN.shape[1]
    dot = M > 2 if cfg.dot is None else cfg.dot
    rows = DOT_ROWS if dot else pl.next_power_of_2(M)  # Triton tiles are powers of two
    x_RxK = jnp.pad(x_MxK, ((0, rows - M), (0, 0)))
    splits = _splits(cfg, K, N)
    k_steps = K // cfg.block_k // splits
    final = splits == 1  # one program per column block: it writes the product itself
    out = pl.pallas_call(
        functools.partial(_kernel, block_n=cfg.block_n, block_k=cfg.block_k, k_steps=k_steps,
                          dot=dot, final=final),
        grid=(N // cfg.block_n, splits),
        out_shape=jax.ShapeDtypeStruct((rows, N), out_dtype) if final
        else jax.ShapeDtypeStruct((splits, rows, N), jnp.float32),
        interpret=backend == "interpret",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        name="gemv")(x_RxK, w_KxN, *(() if scale_N is None or not final else (scale_N,)))
    if final:
        return out[:M]
    y_MxN = jnp.sum(out, axis=0)[:M]
    if scale_N is not None:
        y_MxN = y_MxN * scale_N[None, :]
    return y_MxN.astype(out_dtype)


def gemv(x_MxK, w_KxN, scale_N=None, *, cfg: GemvConfig = GemvConfig(), backend=None,
         out_dtype=None):
    """x [M, K] @ w [K, N] -> [M, N] in out_dtype (None: x's), accumulated in float32.
    w: a float array, or int8 with scale_N [N] float32 (one scale per output column, applied
    to the product). M at most MAX_ROWS; cfg's block sizes must divide K and N."""
    backend = backend or ("gpu" if jax.default_backend() == "gpu" else "interpret")
    if backend not in BACKENDS:
        _fail(f"backend={backend!r}; expected one of {BACKENDS}")
    if x_MxK.ndim != 2 or w_KxN.ndim != 2 or x_MxK.shape[1] != w_KxN.shape[0]:
        _fail(f"expected x [M, K] and w [K, N]; got {x_MxK.shape} and {w_KxN.shape}")
    (M, K), N = x_MxK.shape, w_KxN.shape[1]
    for name, n in (("block_n", cfg.block_n), ("block_k", cfg.block_k)):
        if not _pow2(n) or n < 16:
            _fail(f"{name}={n} must be a power of two >= 16 (a Triton tile)")
    if not supported(M, K, N, cfg):
        _fail(f"[{M}, {K}] x [{K}, {N}] needs 1..{MAX_ROWS} rows, K a multiple of block_k="
              f"{cfg.block_k} and N of block_n={cfg.block_n}")
    if jnp.dtype(w_KxN.dtype) == jnp.int8:
        if scale_N is None or scale_N.shape != (N,):
            _fail(f"int8 w needs scale_N of shape ({N},); got "
                  f"{None if scale_N is None else scale_N.shape}")
    elif scale_N is not None:
        _fail("scale_N goes with int8 w only")
    return _gemv(x_MxK, w_KxN, scale_N, cfg=cfg, backend=backend,
                 out_dtype=jnp.dtype(out_dtype or x_MxK.dtype))
