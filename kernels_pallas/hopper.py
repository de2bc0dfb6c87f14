"""Flash attention for Hopper (sm90) in Pallas Mosaic GPU: a forward, a dQ and a dK/dV kernel.

Every kernel is warp-specialised the same way: a producer warpgroup streams tiles with TMA into a
ring of `slots` shared-memory buffers ("full" mbarriers say a tile landed, "consumed" ones say
both consumers are done with it), and two consumer warpgroups each own 64 rows and run wgmma on
them. In the forward, a schedule barrier makes the two consumers take turns on the tensor cores so
one's softmax overlaps the other's matmuls (the FlashAttention-3 ping-pong).

Masks are a band on (column - row): causal keeps col <= row, a sliding window W keeps
|col - row| < W. Column blocks the band hides from all of a CTA's rows are never loaded; blocks it
cuts are masked elementwise; blocks it covers run unmasked. With segment ids every visited block is
masked, the ids streaming through the ring beside K/V. dK/dV of a kv head accumulate over its
q heads inside the kernel, so GQA never materialises per-q-head K/V gradients.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.experimental.pallas as pl
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


def backward(q, k, v, segment_ids, lse, delta, do, problem):
    from kernels_pallas.hopper_bwd import backward as kernels  # hopper_bwd imports this module
    return kernels(q, k, v, segment_ids, lse, delta, do, problem)


def seq_multiple(problem, S: int) -> int:
    t = tiles(problem, 128)
    return math.lcm(WGS * ROWS, t.block_kv, t.block_kv_dq, t.block_q_dkv)


# --------------------------------------------------------------------------------------------
# Which column blocks rows [r0, r1) see, for the band lo_off <= col - row <= hi_off (None: open)


def _block_ranges(r0, r1, block, n_blocks, lo_off, hi_off, masked_everywhere):
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


def _cta_range(cta_r0, cta_rows, block, n_blocks, band, masked_everywhere):
    """[lo, hi) of column blocks any of a CTA's `cta_rows` rows sees (its warpgroups' own ranges
    lie inside it, see _walk)."""
    lo, hi, _, _ = _block_ranges(cta_r0, cta_r0 + cta_rows, block, n_blocks, *band,
                                 masked_everywhere)
    return lo, hi


def _band(problem):
    """(lo_off, hi_off) of col - row for keys as columns; queries as columns negate and swap."""
    W = problem.sliding_window
    lo_off = None if W is None else -(W - 1)
    hi_off = 0 if problem.causal else (None if W is None else W - 1)
    return lo_off, hi_off


def _transposed(band):
    lo_off, hi_off = band
    return (None if hi_off is None else -hi_off), (None if lo_off is None else -lo_off)


def _visible(shape, r0, c0, band):
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


def _segment_mask(seg_rows, seg_cols_smem, shape):
    """Row ids (already in registers) == column ids (a 1-D SMEM tile)."""
    seg_cols = plgpu.load(seg_cols_smem, layout=plgpu.Layout.WGMMA.reduce(0))
    return (lax.broadcast_in_dim(seg_rows, shape, [0]) ==
            lax.broadcast_in_dim(seg_cols, shape, [1]))


def _mask(s, r0, c0, band, seg_rows, seg_cols_smem):
    """Hide what the band and the segment ids hide; traced even for ranges that turn out
    empty at run time, so it must cope with "nothing to hide"."""
    vis = _visible(s.shape, r0, c0, band)
    if seg_cols_smem is not None:
        seg = _segment_mask(seg_rows, seg_cols_smem, s.shape)
        vis = seg if vis is None else vis & seg
    return s if vis is None else jnp.where(vis, s, MASK)


def _walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry):
    """Visit every CTA step in order: skipped outside [lo, hi), masked on the band's edges,
    unmasked inside; `step(j, carry, kind)` with kind in {'skip', 'masked', 'full'}."""
    run = lambda a, b, kind, c: lax.fori_loop(a, b, lambda j, c: step(j, c, kind), c)
    carry = run(lo_cta, lo, "skip", carry)
    carry = run(lo, full_lo, "masked", carry)
    carry = run(full_lo, full_hi, "full", carry)
    carry = run(full_hi, hi, "masked", carry)
    return run(hi, hi_cta, "skip", carry)


def _smem_tile(shape, dtype):
    swizzle = plgpu.SwizzleTransform(128)
    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))


def _zeros(shape, layout=plgpu.Layout.WGMMA, value=0.0):
    return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


# --------------------------------------------------------------------------------------------
# forward


def forward(q, k, v, segment_ids, problem):
    B, S, H, D = q.shape
    G = k.shape[2]
    R = H // G
    t = tiles(problem, D)
    bkv, ns, dtype = t.block_kv, t.slots, q.dtype
    n_kv, n_cta = S // bkv, S // (WGS * ROWS)
    band = _band(problem)
    c = problem.sm_scale * LOG2E
    segs = problem.has_segments

    def flash_fwd(*refs):  # the name profilers show
        if segs:
            q_ref, k_ref, v_ref, seg_ref, out_ref, lse_ref, *scratch = refs
        else:
            (q_ref, k_ref, v_ref, out_ref, lse_ref, *scratch), seg_ref = refs, None
        (q_smem, k_smem, v_smem, lse_smem, segq_smem, segk_smem,
         q_bar, k_full, v_full, s_full, k_used, v_used, sched) = scratch
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        g = lax.div(h, jnp.int32(R))
        cta = n_cta - 1 - lax.axis_index("q")  # heaviest causal tiles first
        wg = lax.axis_index("wg")
        cta_r0 = cta * (WGS * ROWS)
        lo_cta, hi_cta = _cta_range(cta_r0, WGS * ROWS, bkv, n_kv, band, segs)

        def sched_barrier():
            if t.ping_pong:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            r0 = cta_r0 + wg * ROWS
            qs = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, ROWS), h], qs, q_bar.at[wg])
            seg_rows = None
            if segs:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(r0, ROWS)], segq_smem.at[wg],
                                        q_bar.at[WGS + wg])
                plgpu.barrier_wait(q_bar.at[WGS + wg])
                seg_rows = plgpu.load(segq_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(q_bar.at[wg])
            lo, hi, full_lo, full_hi = _block_ranges(r0, r0 + ROWS, bkv, n_kv, *band, segs)

            def step(j, carry, kind):
                acc, m, l = carry
                slot = lax.rem(j - lo_cta, jnp.int32(ns))
                plgpu.barrier_wait(k_full.at[slot])
                if kind == "skip":
                    plgpu.barrier_arrive(k_used.at[slot])
                    sched_barrier()
                    plgpu.barrier_wait(v_full.at[slot])
                    if segs:
                        plgpu.barrier_wait(s_full.at[slot])
                    sched_barrier()
                    plgpu.barrier_arrive(v_used.at[slot])
                    return carry

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qs, k_smem.at[slot].transpose((1, 0)))
                    sched_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bkv), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                if segs:
                    plgpu.barrier_wait(s_full.at[slot])
                if kind == "masked":
                    s = _mask(s, r0, j * bkv, band, seg_rows, segk_smem.at[slot] if segs else None)
                # the max is scaled after the row reduction, and the exponent is one FMA per logit
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if t.ping_pong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_full.at[slot])
                if t.ping_pong:
                    plgpu.barrier_wait(sched)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l

            carry = (_zeros((ROWS, D)),
                     _zeros((ROWS,), plgpu.Layout.WGMMA.reduce(1), -jnp.inf),
                     _zeros((ROWS,), plgpu.Layout.WGMMA.reduce(1)))
            pl.when(wg == 1)(sched_barrier)
            acc, m, l = _walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry)
            pl.when(wg == 0)(sched_barrier)
            acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
            qs[...] = acc.astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log(l) * LOG2E) * (1.0 / LOG2E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qs, out_ref.at[b, pl.ds(r0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(lo_cta, hi_cta)
            def _(j):
                i = j - lo_cta
                slot = lax.rem(i, jnp.int32(ns))
                rows = (b, pl.ds(j * bkv, bkv), g)
                pl.when(i >= ns)(lambda: plgpu.barrier_wait(k_used.at[slot]))
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
                pl.when(i >= ns)(lambda: plgpu.barrier_wait(v_used.at[slot]))
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(j * bkv, bkv)],
                                            segk_smem.at[slot], s_full.at[slot])

    scratch = [
        _smem_tile((WGS, ROWS, D), dtype), _smem_tile((ns, bkv, D), dtype),
        _smem_tile((ns, bkv, D), dtype), plgpu.SMEM((WGS, ROWS), jnp.float32),
        plgpu.SMEM((WGS, ROWS), jnp.int32), plgpu.SMEM((ns, bkv), jnp.int32),
        plgpu.Barrier(num_barriers=2 * WGS),
        plgpu.Barrier(num_barriers=ns), plgpu.Barrier(num_barriers=ns),
        plgpu.Barrier(num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS),
    ]
    args = (q, k, v) + ((segment_ids,) if segs else ())
    out, lse = plgpu.kernel(
        flash_fwd,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((B, H, S), jnp.float32)),
        scratch_types=scratch,
        grid=(H, n_cta, B), grid_names=("heads", "q", "batch"),
        num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
    return out, lse
