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

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels_pallas import hopper_common as hc
from kernels_pallas.hopper_bwd import backward  # noqa: F401  (the backend's backward)
from kernels_pallas.hopper_common import LOG2E, ROWS, WGS, seq_multiple, tiles  # noqa: F401


# --------------------------------------------------------------------------------------------
# forward


def forward(q, k, v, segments, problem):
    B, S, H, D = q.shape
    G = k.shape[2]
    R = H // G
    t = tiles(problem, D)
    bkv, ns, dtype = t.block_kv, t.slots, q.dtype
    n_kv, n_cta = S // bkv, S // (WGS * ROWS)
    band = hc.band(problem)
    c = problem.sm_scale * LOG2E
    segs = problem.has_segments

    def flash_fwd(*refs):  # the name profilers show
        if segs:
            q_ref, k_ref, v_ref, segq_ref, segk_ref, out_ref, lse_ref, *scratch = refs
        else:
            (q_ref, k_ref, v_ref, out_ref, lse_ref, *scratch) = refs
            segq_ref = segk_ref = None
        (q_smem, k_smem, v_smem, lse_smem, segq_smem, segk_smem,
         q_bar, k_full, v_full, s_full, k_used, v_used, sched) = scratch
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        g = lax.div(h, jnp.int32(R))
        cta = n_cta - 1 - lax.axis_index("q")  # heaviest causal tiles first
        wg = lax.axis_index("wg")
        cta_r0 = cta * (WGS * ROWS)
        lo_cta, hi_cta = hc.cta_range(cta_r0, WGS * ROWS, bkv, n_kv, band, segs)

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
                plgpu.copy_gmem_to_smem(segq_ref.at[b, pl.ds(r0, ROWS)], segq_smem.at[wg],
                                        q_bar.at[WGS + wg])
                plgpu.barrier_wait(q_bar.at[WGS + wg])
                seg_rows = plgpu.load(segq_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(q_bar.at[wg])
            lo, hi, full_lo, full_hi = hc.block_ranges(r0, r0 + ROWS, bkv, n_kv, *band, segs)

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
                    s = hc.mask(s, r0, j * bkv, band, seg_rows, segk_smem.at[slot] if segs else None)
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

            carry = (hc.zeros((ROWS, D)),
                     hc.zeros((ROWS,), plgpu.Layout.WGMMA.reduce(1), -jnp.inf),
                     hc.zeros((ROWS,), plgpu.Layout.WGMMA.reduce(1)))
            pl.when(wg == 1)(sched_barrier)
            acc, m, l = hc.walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry)
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
                    plgpu.copy_gmem_to_smem(segk_ref.at[b, pl.ds(j * bkv, bkv)],
                                            segk_smem.at[slot], s_full.at[slot])

    scratch = [
        hc.smem_tile((WGS, ROWS, D), dtype), hc.smem_tile((ns, bkv, D), dtype),
        hc.smem_tile((ns, bkv, D), dtype), plgpu.SMEM((WGS, ROWS), jnp.float32),
        plgpu.SMEM((WGS, ROWS), jnp.int32), plgpu.SMEM((ns, bkv), jnp.int32),
        plgpu.Barrier(num_barriers=2 * WGS),
        plgpu.Barrier(num_barriers=ns), plgpu.Barrier(num_barriers=ns),
        plgpu.Barrier(num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=ns),
        plgpu.Barrier(num_arrivals=WGS),
    ]
    args = (q, k, v) + (tuple(segments) if segs else ())
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
