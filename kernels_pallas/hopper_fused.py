"""The Hopper flash-attention backward in one kernel (head_dim <= 128): 5 matmuls per tile pair.

Rows are keys, as in hopper_bwd's dK/dV kernel: a CTA keeps 128 keys (64 per consumer
warpgroup) with their dK/dV accumulators and streams Q, dO, lse and delta for every q head of the
kv head's group. Each step also produces dQ's share from the CTA's keys, dQ += dS K: both
consumers write their dS^T half to shared memory, meet at a barrier, and each multiplies the
whole 64 x 128 dS by its half of K's columns (at head_dim 64, whose halves would be too narrow
for wgmma, they take turns with the whole). The float32 share goes out by TMA reduce-add into a
zeroed float32 dQ buffer (dS is double-buffered; the staging tile waits for the last share's
reduce, a step earlier: double-buffering it too would not fit in shared memory).
"""
from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels_pallas.hopper import (
    LOG2E,
    ROWS,
    WGS,
    _band,
    _block_ranges,
    _cta_range,
    _mask,
    _smem_tile,
    _transposed,
    _walk,
    _zeros,
)
from kernels_pallas.hopper_bwd import _load_rows, _stream, _two_products


def _f32_tile(shape):
    swizzle = plgpu.SwizzleTransform(128)
    return plgpu.SMEM(shape, jnp.float32, transforms=(plgpu.TilingTransform((8, 32)), swizzle))


def fused_backward(q, k, v, segment_ids, lse2, delta, do, problem, t):
    B, S, H, D = q.shape
    G = k.shape[2]
    R = H // G
    bq, ns, dtype = ROWS, t.slots, q.dtype  # dS^T tiles are [keys, 64 queries]
    n_q, n_cta = S // bq, S // (WGS * ROWS)
    band, segs = _transposed(_band(problem)), problem.has_segments  # rows are keys here
    c = problem.sm_scale * LOG2E
    # dQ columns per warpgroup, and every how many steps a warpgroup takes its turn
    dq_cols, turn = (D // WGS, 1) if D >= 128 else (D, WGS)

    def flash_bwd_fused(*refs):  # the name profilers show
        n_in = 7 if segs else 6
        ins, (dq_ref, dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 3], refs[n_in + 3:]
        if segs:
            q_ref, k_ref, v_ref, seg_ref, lse_ref, delta_ref, do_ref = ins
        else:
            (q_ref, k_ref, v_ref, lse_ref, delta_ref, do_ref), seg_ref = ins, None
        (k_smem, v_smem, segk_smem, q_smem, do_smem, lse_smem, delta_smem, segq_smem, ds_smem,
         dq_smem, row_bar, ds_ready, done, q_full, do_full, l_full, d_full, s_full,
         used) = scratch
        b, g = lax.axis_index("batch"), lax.axis_index("kv_heads")
        cta = lax.axis_index("kv")  # early key tiles see the most queries: already first
        wg = lax.axis_index("wg")
        cta_r0 = cta * (WGS * ROWS)
        lo_cta, hi_cta = _cta_range(cta_r0, WGS * ROWS, bq, n_q, band, segs)
        n_steps = hi_cta - lo_cta  # per q head of the group

        @pl.when(wg < WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            r0 = cta_r0 + wg * ROWS
            rows = (b, pl.ds(r0, ROWS), g)
            own = pl.ds(wg * ROWS, ROWS)
            ks, vs = k_smem.at[own], v_smem.at[own]
            loads = [(k_ref.at[rows], ks), (v_ref.at[rows], vs)]
            if segs:
                loads.append((seg_ref.at[b, pl.ds(r0, ROWS)], segk_smem.at[wg]))
            _load_rows(loads, row_bar, wg, True)
            seg_rows = (plgpu.load(segk_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                        if segs else None)
            lo, hi, full_lo, full_hi = _block_ranges(r0, r0 + ROWS, bq, n_q, *band, segs)
            shape = (ROWS, bq)
            col_layout = plgpu.Layout.WGMMA.reduce(0)

            def dq_share(i, h, j, ds_tile):
                """dQ[j's rows, this warpgroup's columns] += dS K, out by TMA reduce-add."""
                col0 = 0 if turn > 1 else wg * dq_cols

                def mm(acc):
                    plgpu.wgmma(acc, ds_tile.transpose((1, 0)),
                                k_smem.at[:, pl.ds(col0, dq_cols)])

                share = pl.run_state(mm)(plgpu.ACC.init(_zeros((bq, dq_cols))))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last share's reduce
                dst = dq_smem.at[wg]
                dst[...] = share
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    dst, dq_ref.at[b, pl.ds(j * bq, bq), h, pl.ds(col0, dq_cols)],
                    reduction_op="add")

            def head(r, carry):
                h = g * R + r

                def step(j, carry, kind):
                    dk_acc, dv_acc = carry
                    i = r * n_steps + j - lo_cta
                    slot = lax.rem(i, jnp.int32(ns))
                    ds_tile = ds_smem.at[lax.rem(i, 2)]
                    for bar in (q_full, do_full, l_full, d_full) + ((s_full,) if segs else ()):
                        plgpu.barrier_wait(bar.at[slot])
                    if kind == "skip":  # the other warpgroup's keys may still see these rows
                        ds_tile.at[own][...] = _zeros(shape).astype(dtype)
                    else:
                        sT, dpT = _two_products(shape, ks, q_smem.at[slot], vs, do_smem.at[slot])
                        if kind == "masked":
                            sT = _mask(sT, r0, j * bq, band, seg_rows,
                                       segq_smem.at[slot] if segs else None)
                        lse_cols = plgpu.load(lse_smem.at[slot], layout=col_layout)
                        delta_cols = plgpu.load(delta_smem.at[slot], layout=col_layout)
                        pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse_cols, shape, [1]))
                        dsT = (pT * (dpT - lax.broadcast_in_dim(delta_cols, shape, [1]))
                               ).astype(dtype)
                        ds_tile.at[own][...] = dsT
                    plgpu.commit_smem()
                    if kind != "skip":
                        def grads(refs):
                            dk_ref_acc, dv_ref_acc = refs
                            plgpu.wgmma(dv_ref_acc, pT.astype(dtype), do_smem.at[slot])
                            plgpu.wgmma(dk_ref_acc, dsT, q_smem.at[slot])

                        dk_acc, dv_acc = pl.run_state(grads)((plgpu.ACC.init(dk_acc),
                                                              plgpu.ACC.init(dv_acc)))
                    plgpu.barrier_arrive(used.at[slot])
                    plgpu.barrier_arrive(ds_ready)  # both halves of dS^T are written
                    plgpu.barrier_wait(ds_ready)
                    if turn == 1:
                        dq_share(i, h, j, ds_tile)
                    else:
                        pl.when(lax.rem(i, turn) == wg)(lambda: dq_share(i, h, j, ds_tile))
                    return dk_acc, dv_acc

                return _walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry)

            acc = _zeros((ROWS, D))
            dk_acc, dv_acc = lax.fori_loop(0, R, head, (acc, acc))
            plgpu.barrier_arrive(done)  # the other warpgroup no longer reads our K rows
            plgpu.barrier_wait(done)
            ks[...] = (dk_acc * problem.sm_scale).astype(dtype)
            vs[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ks, dk_ref.at[rows], commit_group=False)
            plgpu.copy_smem_to_gmem(vs, dv_ref.at[rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, R * n_steps)
            def _(i):
                r = lax.div(i, n_steps)
                j = lo_cta + lax.rem(i, n_steps)
                h = g * R + r
                slot = lax.rem(i, jnp.int32(ns))
                pl.when(i >= ns)(lambda: plgpu.barrier_wait(used.at[slot]))
                cols = pl.ds(j * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[b, cols, h], q_smem.at[slot], q_full.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, cols, h], do_smem.at[slot],
                                        do_full.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, cols], lse_smem.at[slot],
                                        l_full.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, cols], delta_smem.at[slot],
                                        d_full.at[slot])
                if segs:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, cols], segq_smem.at[slot],
                                            s_full.at[slot])

    scratch = [
        _smem_tile((WGS * ROWS, D), dtype), _smem_tile((WGS * ROWS, D), dtype),
        plgpu.SMEM((WGS, ROWS), jnp.int32),
        _smem_tile((ns, bq, D), dtype), _smem_tile((ns, bq, D), dtype),
        plgpu.SMEM((ns, bq), jnp.float32), plgpu.SMEM((ns, bq), jnp.float32),
        plgpu.SMEM((ns, bq), jnp.int32),
        _smem_tile((2, WGS * ROWS, bq), dtype), _f32_tile((WGS, bq, dq_cols)),
        plgpu.Barrier(num_barriers=3 * WGS), plgpu.Barrier(num_arrivals=WGS),
        plgpu.Barrier(num_arrivals=WGS), *_stream(ns, 5),
    ]
    args = (q, k, v) + ((segment_ids,) if segs else ()) + (lse2, delta, do)

    def run(refs):
        plgpu.kernel(
            flash_bwd_fused, out_type=(), scratch_types=scratch,
            grid=(G, n_cta, B), grid_names=("kv_heads", "kv", "batch"),
            num_threads=WGS + 1, thread_name="wg",
            compiler_params=plgpu.CompilerParams(approx_math=True),
        )(*args, *refs)

    dq, dk, dv = pl.run_state(run)((jnp.zeros(q.shape, jnp.float32), jnp.empty_like(k),
                                    jnp.empty_like(v)))
    return (dq * problem.sm_scale).astype(dtype), dk, dv
