"""Context parallelism with the Pallas flash kernel computing every block (kernels_pallas): the
sequence is split over the mesh axis the rules give `act_seq`, and each device attends its
queries to every device's keys, block by block, merging the blocks' results by log-sum-exp.

Two ways to reach the other devices' K/V (mesh.context_parallel):
- `ring`: K/V pass around the devices with `ppermute`, each block sent on before its math so
  the two overlap; dK/dV travel with them in the backward and one more hop brings them home.
  Rows are in zig-zag order (jaxlm.parallel.ring.zigzag_order, what StepFns.lay_out gives):
  device i holds chunks i and 2N-1-i of 2N, so causal work is even over devices.
- `all_gather`: K/V are gathered whole onto every device first (no overlap; N times the K/V
  memory), and dK/dV reduce-scattered back; rows in natural order, so under a causal mask
  device i attends i + 1 blocks (the last device does the most).

The kernel masks by index, so both need their token order, one head dim for q, k and v (one
the kernel takes), and no sliding window; jaxlm/parallel/ring.py masks by positions instead.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.parallel.ring import hop, merge_partials, nothing_seen, sequence_specs


def flash_context_attention(q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, segment_ids_BxS, *, causal: bool,
                            scale: float, mesh, rules, gather: bool):
    """Self-attention over a sequence split across devices; returns [B, S, H, D]."""
    q_spec, kv_spec, row_spec, axis, size = sequence_specs(mesh, rules)
    # without segment ids the kernel runs blocks it fully sees unmasked (its fast path)
    segs = () if segment_ids_BxS is None else (segment_ids_BxS.astype(jnp.int32),)
    attend = _flash_gather if gather else _flash_ring

    def local(q, k, v, *segs):
        return attend(causal, scale, axis, size, q, k, v, segs[0] if segs else None)
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(segs),
                         out_specs=q_spec, check_vma=False)(q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, *segs)


def _flash(**kw):
    from kernels_pallas.flash import flash_attention_with_lse
    return functools.partial(flash_attention_with_lse, **kw)


def _block_grads(**kw):
    from kernels_pallas.flash import flash_attention_block_grads
    return functools.partial(flash_attention_block_grads, **kw)


def _backward_inputs(res, dout_BxSxHxD):
    """(q, k, v, seg, lse, dout in q's dtype, delta): what every block's backward reads;
    delta = rowsum(out * dout) [B, H, S], the softmax backward's row term over the whole row."""
    q, k, v, seg, out, lse_BxHxS = res
    do = dout_BxSxHxD.astype(q.dtype)
    delta_BxHxS = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    return q, k, v, seg, lse_BxHxS, do, delta_BxHxS


# ---- ring ----------------------------------------------------------------------------------
# Device i holds zig-zag chunks (i, 2N-1-i) as its halves a and b. With causal masking, the
# block from device j (step s: j = i - s mod N) is, for s = 0, causal over the local rows; for
# j < i, all of i's rows see j's half a and none of its half b; for j > i, only i's half b
# sees anything, and it sees all of j's block. Either way the work is two c x c non-causal
# pairs, (q_x, k_a) and (q_b, k_x) with x = a when j < i else b, stacked on the batch axis into
# one kernel call: every device does the same work at every step.


def _halves(earlier, S: int):
    """Slicers of the sequence axis (1) for a cross block's pairs (q_x, k_a) and (q_b, k_x):
    x (half a if the block comes from an earlier device, else b), b and a. None stays None
    (rows without segment ids)."""
    c = S // 2

    def at(start):
        return lambda t: None if t is None else jax.lax.dynamic_slice_in_dim(t, start, c, axis=1)
    return at(jnp.where(earlier, 0, c)), at(c), at(0)


def _stack2(first, second):
    """Two halves' arrays on one batch axis (None: rows without segment ids)."""
    return None if first is None else jnp.concatenate([first, second], axis=0)


def _hops(block, axis, size):
    return jax.tree.map(lambda x: hop(x, axis, size), block)  # None (no segments) stays


def _at_rows(part_BxCx___, first_half, axis=1, fill=0.0):
    """A half-length block placed in the first or second half of a full-length one."""
    blank = jnp.full_like(part_BxCx___, fill)
    return jnp.where(first_half, jnp.concatenate([part_BxCx___, blank], axis),
                     jnp.concatenate([blank, part_BxCx___], axis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash_ring(causal, scale, axis, size, q, k, v, seg):
    return _flash_ring_fwd(causal, scale, axis, size, q, k, v, seg)[0]


def _flash_ring_fwd(causal, scale, axis, size, q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS):
    flash = _flash(sm_scale=scale)
    me = jax.lax.axis_index(axis)
    B, S = q_BxSxHxD.shape[:2]
    acc = nothing_seen(*q_BxSxHxD.shape)
    block = (k_BxSxGxD, v_BxSxGxD, seg_BxS)
    for step in range(size):
        k, v, seg_k = block
        if step + 1 < size:
            block = _hops(block, axis, size)
        if step == 0 or not causal:
            out, lse = flash(q_BxSxHxD, k, v, causal=causal and step == 0, segment_ids=seg_BxS,
                             kv_segment_ids=seg_k)
            acc = merge_partials(*acc, out, lse)
            continue
        earlier = (me - step) % size < me
        x, b, a = _halves(earlier, S)
        out, lse = flash(_stack2(x(q_BxSxHxD), b(q_BxSxHxD)), _stack2(a(k), x(k)),
                         _stack2(a(v), x(v)), causal=False,
                         segment_ids=_stack2(x(seg_BxS), b(seg_BxS)),
                         kv_segment_ids=_stack2(a(seg_k), x(seg_k)))
        for rows_x, part in ((earlier, slice(None, B)), (False, slice(B, None))):
            acc = merge_partials(*acc, _at_rows(out[part], rows_x),
                         _at_rows(lse[part], rows_x, axis=2, fill=-jnp.inf))
    out_BxSxHxD = acc[0].astype(q_BxSxHxD.dtype)
    return out_BxSxHxD, (q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS, out_BxSxHxD, acc[1])


def _flash_ring_bwd(causal, scale, axis, size, res, dout_BxSxHxD):
    grads = _block_grads(sm_scale=scale)
    q, k, v, seg, lse_BxHxS, do, delta_BxHxS = _backward_inputs(res, dout_BxSxHxD)
    me = jax.lax.axis_index(axis)
    B = q.shape[0]
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    block = (k, v, seg)
    for step in range(size):
        if step:  # dK, dV of the block just done travel with it
            dk, dv = hop(dk, axis, size), hop(dv, axis, size)
        kb, vb, seg_k = block
        if step + 1 < size:
            block = _hops(block, axis, size)
        if step == 0 or not causal:
            g = grads(q, kb, vb, lse_BxHxS, delta_BxHxS, do, causal=causal and step == 0,
                      segment_ids=seg, kv_segment_ids=seg_k)
            dq, dk, dv = dq + g[0], dk + g[1], dv + g[2]
            continue
        earlier = (me - step) % size < me
        x, b, a = _halves(earlier, q.shape[1])
        rows = lambda f, t: jnp.swapaxes(f(jnp.swapaxes(t, 1, 2)), 1, 2)  # noqa: E731  [B,H,S]
        g = grads(_stack2(x(q), b(q)), _stack2(a(kb), x(kb)), _stack2(a(vb), x(vb)),
                  _stack2(rows(x, lse_BxHxS), rows(b, lse_BxHxS)),
                  _stack2(rows(x, delta_BxHxS), rows(b, delta_BxHxS)), _stack2(x(do), b(do)),
                  causal=False, segment_ids=_stack2(x(seg), b(seg)),
                  kv_segment_ids=_stack2(a(seg_k), x(seg_k)))
        (dq_x, dq_b), (dk_a, dk_y), (dv_a, dv_y) = (
            (t[:B].astype(jnp.float32), t[B:].astype(jnp.float32)) for t in g)
        dq = dq + _at_rows(dq_x, earlier) + _at_rows(dq_b, False)
        dk = dk + _at_rows(dk_a, True) + _at_rows(dk_y, earlier)
        dv = dv + _at_rows(dv_a, True) + _at_rows(dv_y, earlier)
    dk, dv = hop(dk, axis, size), hop(dv, axis, size)  # home: each block's owner
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash_ring.defvjp(_flash_ring_fwd, _flash_ring_bwd)


# ---- all-gather ----------------------------------------------------------------------------
# Key block j (device j's rows) against this device's (me) queries, in natural order: all
# visible when j < me (or without a causal mask), causal when j == me, hidden when j > me.
FULL, DIAGONAL, HIDDEN = 0, 1, 2


def _kind(causal, j, me):
    if not causal:
        return FULL
    return jnp.where(j < me, FULL, jnp.where(j == me, DIAGONAL, HIDDEN))


def _gather(x, axis):
    return None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _block(x, j, c):
    return None if x is None else x[:, j * c:(j + 1) * c]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash_gather(causal, scale, axis, size, q, k, v, seg):
    return _flash_gather_fwd(causal, scale, axis, size, q, k, v, seg)[0]


def _flash_gather_fwd(causal, scale, axis, size, q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS):
    flash = _flash(sm_scale=scale)
    me = jax.lax.axis_index(axis)
    B, S = q_BxSxHxD.shape[:2]
    k_all, v_all, seg_all = (_gather(x, axis) for x in (k_BxSxGxD, v_BxSxGxD, seg_BxS))
    acc = nothing_seen(*q_BxSxHxD.shape)
    for j in range(size):
        k, v, seg_k = (_block(x, j, S) for x in (k_all, v_all, seg_all))
        def run(causal_block, k=k, v=v, seg_k=seg_k):
            out, lse = flash(q_BxSxHxD, k, v, causal=causal_block, segment_ids=seg_BxS,
                             kv_segment_ids=seg_k)
            return out.astype(jnp.float32), lse  # as nothing_seen's: switch branches agree
        out, lse = jax.lax.switch(_kind(causal, j, me), [
            lambda: run(False), lambda: run(True), lambda: nothing_seen(*q_BxSxHxD.shape)])
        acc = merge_partials(*acc, out, lse)
    out_BxSxHxD = acc[0].astype(q_BxSxHxD.dtype)
    return out_BxSxHxD, (q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS, out_BxSxHxD, acc[1])


def _flash_gather_bwd(causal, scale, axis, size, res, dout_BxSxHxD):
    grads = _block_grads(sm_scale=scale)
    q, k, v, seg, lse_BxHxS, do, delta_BxHxS = _backward_inputs(res, dout_BxSxHxD)
    me = jax.lax.axis_index(axis)
    S = q.shape[1]
    k_all, v_all, seg_all = (_gather(x, axis) for x in (k, v, seg))
    dq = jnp.zeros(q.shape, jnp.float32)
    dk_blocks, dv_blocks = [], []
    for j in range(size):
        kb, vb, seg_k = (_block(x, j, S) for x in (k_all, v_all, seg_all))
        run = lambda causal_block, kb=kb, vb=vb, seg_k=seg_k: tuple(  # noqa: E731
            g.astype(jnp.float32) for g in grads(q, kb, vb, lse_BxHxS, delta_BxHxS, do,
                                                 causal=causal_block, segment_ids=seg,
                                                 kv_segment_ids=seg_k))
        hidden = lambda kb=kb: (jnp.zeros(q.shape, jnp.float32),  # noqa: E731
                                jnp.zeros(kb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32))
        g = jax.lax.switch(_kind(causal, j, me), [lambda: run(False), lambda: run(True), hidden])
        dq = dq + g[0]
        dk_blocks.append(g[1])
        dv_blocks.append(g[2])
    # every device holds a share of every block's dK/dV: sum them onto the block's owner
    dk, dv = (jax.lax.psum_scatter(jnp.concatenate(blocks, axis=1), axis, scatter_dimension=1,
                                   tiled=True) for blocks in (dk_blocks, dv_blocks))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash_gather.defvjp(_flash_gather_fwd, _flash_gather_bwd)
