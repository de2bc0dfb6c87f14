"""The Hopper flash-attention backward: a dQ kernel (rows = queries, streaming K/V) and a dK/dV
kernel (rows = keys, streaming Q/dO/lse/delta for every q head of the kv head's group).

Same shape as the forward (see hopper.py): one TMA producer warpgroup and a ring of `slots`
shared-memory buffers, two consumer warpgroups of 64 rows each; here one "consumed" barrier per
slot covers all of a step's tiles, since every tile is used until the step's last wgmma.
Gradients w.r.t. the unscaled logits are dS = P * (dP - delta); dQ = scale * dS K and
dK = scale * dS^T Q. The split recomputes S and dP for dQ (7 matmuls per tile pair, not 5), yet
two fused designs adding dQ shares into a float32 buffer by TMA reduce-add measured slower on an
H100 (benchmarks/RESULTS.md; the second is commit 69445e4), so the split stays.

Up to head_dim 128 each consumer owns 64 rows. At 256 the float32 accumulators of 64 rows (dK and
dV: 2 x 128 registers per thread) would not fit, so both consumers take the same 64 rows, both
compute S and dP over all of head_dim, and each accumulates its half of the output columns
(`_Share`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels_pallas import hopper_common as hc
from kernels_pallas.hopper_common import LOG2E, ROWS, WGS, tiles


def backward(q, k, v, segments, lse, delta, do, problem):
    t = tiles(problem, q.shape[-1])
    lse2 = lse * LOG2E  # the kernels work in base 2
    dq = _dq(q, k, v, segments, lse2, delta, do, problem, t)
    dk, dv = _dkv(q, k, v, segments, lse2, delta, do, problem, t)
    return dq, dk, dv


class _Share(NamedTuple):
    """How a CTA's two consumer warpgroups split its work: by rows, or (past head_dim 128) both
    on the same rows, each owning `cols` of the output's head_dim."""
    by_columns: bool
    row_tiles: int   # 64-row tiles per CTA
    cols: int        # output columns per warpgroup

    @property
    def cta_rows(self):
        return self.row_tiles * ROWS

    def row(self, wg):
        """Which of the CTA's row tiles warpgroup `wg` works on. (wg * 0, not 0: Mosaic GPU in
        jax 0.11 fails to lower a loop body that uses a ref view at a constant index.)"""
        return wg * 0 if self.by_columns else wg

    def issues(self, wg):
        """Whether warpgroup `wg` loads its row tile (shared rows are loaded once)."""
        return wg == 0 if self.by_columns else True

    def own(self, ref, wg):
        """Warpgroup `wg`'s output columns of a [rows, head_dim] ref."""
        return ref.at[:, pl.ds(wg * self.cols, self.cols)] if self.by_columns else ref


def _share(head_dim):
    if head_dim <= 128:
        return _Share(False, WGS, head_dim)
    return _Share(True, 1, head_dim // WGS)


def _two_products(shape, a1, b1, a2, b2):
    """(a1 b1^T, a2 b2^T) in float32 from shared-memory tiles: the logits and dP of a tile pair,
    issued together so one wgmma wait covers both."""
    def issue(refs):
        plgpu.wgmma(refs[0], a1, b1.transpose((1, 0)))
        plgpu.wgmma(refs[1], a2, b2.transpose((1, 0)))

    return pl.run_state(issue)((plgpu.ACC.init(hc.zeros(shape)), plgpu.ACC.init(hc.zeros(shape))))


def _load_rows(loads, row_bar, row, issue):
    """A row tile's fixed tiles for the whole kernel: all copies in flight (if `issue`), then all
    waits (each copy has its own barrier: one mbarrier counts one expected transfer)."""
    def start():
        for i, (src, dst) in enumerate(loads):
            plgpu.copy_gmem_to_smem(src, dst, row_bar.at[i * WGS + row])

    start() if issue is True else pl.when(issue)(start)

    for i in range(len(loads)):
        plgpu.barrier_wait(row_bar.at[i * WGS + row])


def _store_rows(pairs, done, share, wg):
    """Write each (value, smem tile, gmem ref) of a warpgroup's result out through shared memory.
    Sharing rows, each warpgroup writes its columns once the other stopped reading the tile, and
    the first copies the whole tile once both wrote (TMA needs a contiguous tile)."""
    def both_here():
        if share.by_columns:
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)

    both_here()
    for value, smem, _ in pairs:
        share.own(smem, wg)[...] = value
    plgpu.commit_smem()
    both_here()

    def copy():
        for _, smem, gmem in pairs:
            plgpu.copy_smem_to_gmem(smem, gmem, commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == 0)(copy) if share.by_columns else copy()


def _stream(ns, n_streams):
    """Barriers for a ring of `ns` slots fed by `n_streams` copies per step."""
    return ([plgpu.Barrier(num_barriers=ns) for _ in range(n_streams)]
            + [plgpu.Barrier(num_arrivals=WGS, num_barriers=ns)])


def _dq(q, k, v, segments, lse2, delta, do, problem, t):
    B, S, H, D = q.shape
    R = H // k.shape[2]
    bkv, ns, dtype = t.block_kv_dq, t.slots, q.dtype
    share = _share(D)
    n_kv, n_cta = S // bkv, S // share.cta_rows
    band, segs = hc.band(problem), problem.has_segments
    c = problem.sm_scale * LOG2E

    def flash_bwd_dq(*refs):  # the name profilers show
        n_in = 8 if segs else 6
        ins, (dq_ref,), scratch = refs[:n_in], refs[n_in:n_in + 1], refs[n_in + 1:]
        if segs:
            q_ref, k_ref, v_ref, segq_ref, segk_ref, lse_ref, delta_ref, do_ref = ins
        else:
            (q_ref, k_ref, v_ref, lse_ref, delta_ref, do_ref) = ins
            segq_ref = segk_ref = None
        (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, segq_smem, segk_smem,
         row_bar, done, k_full, v_full, s_full, used) = scratch
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        g = lax.div(h, jnp.int32(R))
        cta = n_cta - 1 - lax.axis_index("q")
        wg = lax.axis_index("wg")
        cta_r0 = cta * share.cta_rows
        lo_cta, hi_cta = hc.cta_range(cta_r0, share.cta_rows, bkv, n_kv, band, segs)

        @pl.when(wg < WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row = share.row(wg)
            r0 = cta_r0 + row * ROWS
            rows = (b, pl.ds(r0, ROWS), h)
            qs, dos = q_smem.at[row], do_smem.at[row]
            loads = [(q_ref.at[rows], qs), (do_ref.at[rows], dos),
                     (lse_ref.at[b, h, pl.ds(r0, ROWS)], lse_smem.at[row]),
                     (delta_ref.at[b, h, pl.ds(r0, ROWS)], delta_smem.at[row])]
            if segs:
                loads.append((segq_ref.at[b, pl.ds(r0, ROWS)], segq_smem.at[row]))
            _load_rows(loads, row_bar, row, share.issues(wg))
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lse_rows = plgpu.load(lse_smem.at[row], layout=row_layout)
            delta_rows = plgpu.load(delta_smem.at[row], layout=row_layout)
            seg_rows = plgpu.load(segq_smem.at[row], layout=row_layout) if segs else None
            lo, hi, full_lo, full_hi = hc.block_ranges(r0, r0 + ROWS, bkv, n_kv, *band, segs)
            shape = (ROWS, bkv)

            def step(j, dq_acc, kind):
                slot = lax.rem(j - lo_cta, jnp.int32(ns))
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_wait(v_full.at[slot])
                if segs:
                    plgpu.barrier_wait(s_full.at[slot])
                if kind == "skip":
                    plgpu.barrier_arrive(used.at[slot])
                    return dq_acc

                s, dp = _two_products(shape, qs, k_smem.at[slot], dos, v_smem.at[slot])
                if kind == "masked":
                    s = hc.mask(s, r0, j * bkv, band, seg_rows, segk_smem.at[slot] if segs else None)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse_rows, shape, [0]))
                ds = p * (dp - lax.broadcast_in_dim(delta_rows, shape, [0]))

                def dq_mm(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), share.own(k_smem.at[slot], wg))

                dq_acc = pl.run_state(dq_mm)(plgpu.ACC.init(dq_acc))
                plgpu.barrier_arrive(used.at[slot])
                return dq_acc

            dq_acc = hc.walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step,
                           hc.zeros((ROWS, share.cols)))
            _store_rows([((dq_acc * problem.sm_scale).astype(dtype), qs, dq_ref.at[rows])],
                        done, share, wg)

        @pl.when(wg == WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(lo_cta, hi_cta)
            def _(j):
                i = j - lo_cta
                slot = lax.rem(i, jnp.int32(ns))
                pl.when(i >= ns)(lambda: plgpu.barrier_wait(used.at[slot]))
                rows = (b, pl.ds(j * bkv, bkv), g)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])
                if segs:
                    plgpu.copy_gmem_to_smem(segk_ref.at[b, pl.ds(j * bkv, bkv)],
                                            segk_smem.at[slot], s_full.at[slot])

    nr = share.row_tiles
    scratch = [
        hc.smem_tile((nr, ROWS, D), dtype), hc.smem_tile((nr, ROWS, D), dtype),
        hc.smem_tile((ns, bkv, D), dtype), hc.smem_tile((ns, bkv, D), dtype),
        plgpu.SMEM((nr, ROWS), jnp.float32), plgpu.SMEM((nr, ROWS), jnp.float32),
        plgpu.SMEM((nr, ROWS), jnp.int32), plgpu.SMEM((ns, bkv), jnp.int32),
        plgpu.Barrier(num_barriers=5 * WGS), plgpu.Barrier(num_arrivals=WGS), *_stream(ns, 3),
    ]
    args = (q, k, v) + (tuple(segments) if segs else ()) + (lse2, delta, do)
    return plgpu.kernel(
        flash_bwd_dq, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=scratch,
        grid=(H, n_cta, B), grid_names=("heads", "q", "batch"),
        num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)


def _dkv(q, k, v, segments, lse2, delta, do, problem, t):
    B, S, H, D = q.shape
    G = k.shape[2]
    R = H // G
    bq, ns, dtype = t.block_q_dkv, t.slots, q.dtype
    share = _share(D)
    n_q, n_cta = S // bq, S // share.cta_rows
    band, segs = hc.transposed(hc.band(problem)), problem.has_segments  # rows are keys here
    c = problem.sm_scale * LOG2E

    def flash_bwd_dkv(*refs):  # the name profilers show
        n_in = 8 if segs else 6
        ins, (dk_ref, dv_ref), scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
        if segs:
            q_ref, k_ref, v_ref, segq_ref, segk_ref, lse_ref, delta_ref, do_ref = ins
        else:
            (q_ref, k_ref, v_ref, lse_ref, delta_ref, do_ref) = ins
            segq_ref = segk_ref = None
        (k_smem, v_smem, segk_smem, q_smem, do_smem, lse_smem, delta_smem, segq_smem,
         row_bar, done, q_full, do_full, l_full, d_full, s_full, used) = scratch
        b, g = lax.axis_index("batch"), lax.axis_index("kv_heads")
        cta = lax.axis_index("kv")  # early key tiles see the most queries: already first
        wg = lax.axis_index("wg")
        cta_r0 = cta * share.cta_rows
        lo_cta, hi_cta = hc.cta_range(cta_r0, share.cta_rows, bq, n_q, band, segs)
        n_steps = hi_cta - lo_cta  # per q head of the group

        @pl.when(wg < WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row = share.row(wg)
            r0 = cta_r0 + row * ROWS
            rows = (b, pl.ds(r0, ROWS), g)
            ks, vs = k_smem.at[row], v_smem.at[row]
            loads = [(k_ref.at[rows], ks), (v_ref.at[rows], vs)]
            if segs:
                loads.append((segk_ref.at[b, pl.ds(r0, ROWS)], segk_smem.at[row]))
            _load_rows(loads, row_bar, row, share.issues(wg))
            seg_rows = (plgpu.load(segk_smem.at[row], layout=plgpu.Layout.WGMMA.reduce(1))
                        if segs else None)
            lo, hi, full_lo, full_hi = hc.block_ranges(r0, r0 + ROWS, bq, n_q, *band, segs)
            shape = (ROWS, bq)
            col_layout = plgpu.Layout.WGMMA.reduce(0)

            def head(r, carry):
                def step(j, carry, kind):
                    dk_acc, dv_acc = carry
                    slot = lax.rem(r * n_steps + j - lo_cta, jnp.int32(ns))
                    for bar in (q_full, do_full, l_full, d_full) + ((s_full,) if segs else ()):
                        plgpu.barrier_wait(bar.at[slot])
                    if kind == "skip":
                        plgpu.barrier_arrive(used.at[slot])
                        return carry

                    sT, dpT = _two_products(shape, ks, q_smem.at[slot], vs, do_smem.at[slot])
                    if kind == "masked":
                        sT = hc.mask(sT, r0, j * bq, band, seg_rows,
                                   segq_smem.at[slot] if segs else None)
                    lse_cols = plgpu.load(lse_smem.at[slot], layout=col_layout)
                    delta_cols = plgpu.load(delta_smem.at[slot], layout=col_layout)
                    pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse_cols, shape, [1]))
                    dsT = pT * (dpT - lax.broadcast_in_dim(delta_cols, shape, [1]))

                    def grads(refs):
                        dk_ref_acc, dv_ref_acc = refs
                        dos, qs = (share.own(r.at[slot], wg) for r in (do_smem, q_smem))
                        plgpu.wgmma(dv_ref_acc, pT.astype(dtype), dos)
                        plgpu.wgmma(dk_ref_acc, dsT.astype(dtype), qs)

                    dk_acc, dv_acc = pl.run_state(grads)((plgpu.ACC.init(dk_acc),
                                                          plgpu.ACC.init(dv_acc)))
                    plgpu.barrier_arrive(used.at[slot])
                    return dk_acc, dv_acc

                return hc.walk(lo_cta, hi_cta, lo, hi, full_lo, full_hi, step, carry)

            acc = hc.zeros((ROWS, share.cols))
            dk_acc, dv_acc = lax.fori_loop(0, R, head, (acc, acc))
            _store_rows([((dk_acc * problem.sm_scale).astype(dtype), ks, dk_ref.at[rows]),
                         (dv_acc.astype(dtype), vs, dv_ref.at[rows])], done, share, wg)

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
                    plgpu.copy_gmem_to_smem(segq_ref.at[b, cols], segq_smem.at[slot],
                                            s_full.at[slot])

    nr = share.row_tiles
    scratch = [
        hc.smem_tile((nr, ROWS, D), dtype), hc.smem_tile((nr, ROWS, D), dtype),
        plgpu.SMEM((nr, ROWS), jnp.int32),
        hc.smem_tile((ns, bq, D), dtype), hc.smem_tile((ns, bq, D), dtype),
        plgpu.SMEM((ns, bq), jnp.float32), plgpu.SMEM((ns, bq), jnp.float32),
        plgpu.SMEM((ns, bq), jnp.int32),
        plgpu.Barrier(num_barriers=3 * WGS), plgpu.Barrier(num_arrivals=WGS), *_stream(ns, 5),
    ]
    args = (q, k, v) + (tuple(segments) if segs else ()) + (lse2, delta, do)
    return plgpu.kernel(
        flash_bwd_dkv, out_type=(jax.ShapeDtypeStruct(k.shape, dtype),) * 2, scratch_types=scratch,
        grid=(G, n_cta, B), grid_names=("kv_heads", "kv", "batch"),
        num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
