"""What the Hopper forward (hopper.py) and backward (hopper_bwd.py) kernels share: tile sizes,
which column blocks a band of (column - row) makes visible, the elementwise band and segment
masks, the walk over a CTA's blocks, shared-memory tiles and register constants.

Masks are a band on (column - row): causal keeps col <= row, a sliding window W keeps
|col - row| < W. Column blocks the band hides from all of a CTA's rows are never loaded; blocks it
cuts are masked elementwise; blocks it covers run unmasked.
"""
from __future__ import annotations

import dataclasses
import math

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
# Finite, so a fully hidden first block cannot make the running max NaN; a power of two, so
# MASK * scale is exact and exp2(fma(MASK, scale, -MASK * scale)) is exactly 1, never inf.
MASK = -(2.0 ** 100)
ROWS = 64     # rows of one warpgroup's wgmma
WGS = 2       # consumer warpgroups per CTA


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_kv: int      # forward: keys per streamed tile
    block_kv_dq: int   # dQ kernel: keys per streamed tile
    block_q_dkv: int   # dK/dV kernel: queries per streamed tile
    slots: int = 2
    ping_pong: bool = True


def tiles(problem, head_dim: int) -> Tiles:
    b = problem.blocks
    if b.block_q not in (None, ROWS):
        raise ValueError(f"hopper flash attention: block_q is fixed at {ROWS} rows per warpgroup "
                         f"({WGS * ROWS} per CTA); got {b.block_q}")
    big = 128 if head_dim <= 128 else 64
    t = Tiles(block_kv=b.block_kv or big, block_kv_dq=b.block_kv_bwd or 64,
              block_q_dkv=b.block_q_bwd or 64, slots=b.stages or 2,
              ping_pong=True if b.ping_pong is None else b.ping_pong)
    if t.slots < 2:
        raise ValueError(f"hopper flash attention: stages={t.slots}; need at least 2")
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
        if getattr(t, name) % 64:
            raise ValueError(f"hopper flash attention: {name}={getattr(t, name)} must be a "
                             f"multiple of 64")
    return t


def seq_multiple(problem, S: int) -> int:
    t = tiles(problem, 128)
    return math.lcm(WGS * ROWS, t.block_kv, t.block_kv_dq, t.block_q_dkv)


# --------------------------------------------------------------------------------------------
# Which column blocks rows [r0, r1) see, for the band lo_off <= col - row <= hi_off (None: open)


def block_ranges(r0, r1, block, n_blocks, lo_off, hi_off, masked_everywhere):
    """(lo, hi, full_lo, full_hi): blocks [lo, hi) are visible at all; [full_lo, full_hi) fully.

    All quantities are non-negative, so lax.div is floor division."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    lo, hi = i32(0), i32(n_blocks)
    full_lo, full_hi = i32(0), i32(n_blocks)
    if lo_off is not None:
        lo = lax.div(jnp.maximum(r0 + lo_off, 0), i32(block))
        full_lo = lax.div(jnp.maximum(r1 - 1 + lo_off, 0) + block - 1, i32(block))
    if hi_off is not None:
        hi = jnp.minimum(lax.div(r1 - 1 + hi_off, i32(block)) + 1, n_blocks)
        full_hi = lax.div(r0 + hi_off + 1, i32(block))
    if masked_everywhere:
        full_lo = full_hi = hi
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, hi, full_lo, full_hi


def cta_range(cta_r0, cta_rows, block, n_blocks, band, masked_everywhere):
    """[lo, hi) of column blocks any of a CTA's `cta_rows` rows sees (its warpgroups' own ranges
    lie inside it, see walk)."""
    lo, hi, _, _ = block_ranges(cta_r0, cta_r0 + cta_rows, block, n_blocks, *band,
                                 masked_everywhere)
    return lo, hi


def band(problem):
    """(lo_off, hi_off) of col - row for keys as columns; queries as columns negate and swap."""
    W = problem.sliding_window
    lo_off = None if W is None else -(W - 1)
    hi_off = 0 if problem.causal else (None if W is None else W - 1)
    return lo_off, hi_off


def transposed(band):
    lo_off, hi_off = band
    return (None if hi_off is None else -hi_off), (None if lo_off is None else -lo_off)


def visible(shape, r0, c0, band):
    """Elementwise band mask for a [rows, cols] tile whose corner is (r0, c0); None = all."""
    lo_off, hi_off = band
    if lo_off is None and hi_off is None:
        return None
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    d = (cols + c0) - (rows + r0)
    vis = None
    if lo_off is not None:
        vis = d >= lo_off
    if hi_off is not None:
        vis = (d <= hi_off) if vis is None else vis & (d <= hi_off)
    return vis


def segment_mask(seg_rows, seg_cols_smem, shape):
    """Row ids (already in registers) == column ids (a 1-D SMEM tile)."""
    seg_cols = plgpu.load(seg_cols_smem, layout=plgpu.Layout.WGMMA.reduce(0))
    return (lax.broadcast_in_dim(seg_rows, shape, [0]) ==
            lax.broadcast_in_dim(seg_cols, shape, [1]))


def mask(s, r0, c0, band, seg_rows, seg_cols_smem):
    """Hide what the band and the segment ids hide; traced even for ranges that turn out
    empty at run time, so it must cope with "nothing to hide"."""
    vis = visible(s.shape, r0, c0, band)
    if seg_cols_smem is not None:
        seg = segment_mask(seg_rows, seg_cols_smem, s.shape)
        vis = seg if vis is None else vis & seg
    return s if vis is None else jnp.where(vis, s, MASK)


def walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry):
    """Visit every CTA step in order: skipped outside [lo, hi), masked on the band's edges,
    unmasked inside; `step(j, carry, kind)` with kind in {'skip', 'masked', 'full'}."""
    run = lambda a, b, kind, c: lax.fori_loop(a, b, lambda j, c: step(j, c, kind), c)
    carry = run(lo_cta, lo, "skip", carry)
    carry = run(lo, full_lo, "masked", carry)
    carry = run(full_lo, full_hi, "full", carry)
    carry = run(full_hi, hi, "masked", carry)
    return run(hi, hi_cta, "skip", carry)


def smem_tile(shape, dtype):
    swizzle = plgpu.SwizzleTransform(128)
    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))


def zeros(shape, layout=plgpu.Layout.WGMMA, value=0.0):
    return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)
