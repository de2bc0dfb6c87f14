"""Ring attention: context parallelism over the mesh axis the sequence is split on.

Each device keeps its own queries and passes its keys and values around the ring (`ppermute`
to the next device, N - 1 times for N devices), so no device ever holds more than two blocks of
K/V, against the whole sequence's for an all-gather. Every block's partial attention is merged
into the running output by log-sum-exp. The backward pass is the same ring again: K/V travel
with the gradients accumulated for them (dK, dV), and one more hop brings those home.

Masks come from token positions and segment ids, not from array indices, so a row may be laid
out in any order across the ring (the zig-zag order that evens out causal work included):
query i sees key j when both are in one segment, pos_j <= pos_i (causal) and |pos_i - pos_j| <
window (sliding). A query that sees no key attends uniformly over all of them, as `attend`'s
reference does with its finite MASKED logit.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.parallel.sharding import logical_to_spec

MASKED = -1e30  # as jaxlm.nn.attend: finite, so a fully masked row is uniform, not NaN


def ring_attention(q_BxSxHxK, k_BxSxGxK, v_BxSxGxV, positions_BxS, segment_ids_BxS, *,
                   causal: bool, sliding_window: int | None, scale: float, mesh, rules,
                   kernel: bool = False):
    """Self-attention with the sequence split over the mesh axis the rules give `act_seq`
    (batch and heads split as the activation rules split them). Returns [B, S, H, V].

    kernel=False: each block in jnp, masked by positions (any token order; it holds a block's
    [S_local, S_local] logits). kernel=True: each block through the Pallas flash kernel
    (kernels_pallas), which masks by index: causal rows must be in the zig-zag order of
    `zigzag_order` (what StepFns.lay_out gives), q/k/v share one head dim the kernel takes, and
    there is no sliding window."""
    q_spec = logical_to_spec(("act_batch", "act_seq", "act_heads", None), rules, mesh)
    kv_spec = logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None), rules, mesh)
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"ring attention needs kv heads split like q heads (act_heads -> "
                         f"{q_spec[2]}, act_kv_heads -> {kv_spec[2]})")
    axis = q_spec[1]
    size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    row_spec = P(q_spec[0], axis)
    if kernel:
        if sliding_window is not None:
            raise ValueError("ring attention with the flash kernel takes no sliding window")
        # without segment ids the kernel runs blocks it fully sees unmasked (its fast path)
        segs = () if segment_ids_BxS is None else (segment_ids_BxS.astype(jnp.int32),)

        def local(q, k, v, *segs):
            return _flash_ring(causal, scale, axis, size, q, k, v, segs[0] if segs else None)
        return jax.shard_map(local, mesh=mesh,
                             in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(segs),
                             out_specs=q_spec, check_vma=False)(
            q_BxSxHxK, k_BxSxGxK, v_BxSxGxV, *segs)
    if segment_ids_BxS is None:
        segment_ids_BxS = jnp.ones(q_BxSxHxK.shape[:2], jnp.int32)
    local = functools.partial(_ring, causal, sliding_window, scale, axis, size)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                         out_specs=q_spec, check_vma=False)(
        q_BxSxHxK, k_BxSxGxK, v_BxSxGxV, positions_BxS.astype(jnp.int32),
        segment_ids_BxS.astype(jnp.int32))


def zigzag_order(seq_len: int, devices: int):
    """The token order that evens out causal work over a ring of `devices`: the sequence cut
    into 2N chunks, device i holding chunk i and chunk 2N - 1 - i (an early and a late one).
    Returns the permutation (an index array) from natural order to that layout."""
    if seq_len % (2 * devices):
        raise ValueError(f"a zig-zag layout cuts the sequence into 2 x {devices} chunks: "
                         f"{seq_len} tokens do not divide")
    chunks = np.arange(seq_len).reshape(2 * devices, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * devices - 1 - i]])
                           for i in range(devices)])


def _allowed(causal, window, pos_q_BxS, seg_q_BxS, pos_k_BxT, seg_k_BxT):
    ok_BxSxT = seg_q_BxS[:, :, None] == seg_k_BxT[:, None, :]
    if causal:
        ok_BxSxT &= pos_k_BxT[:, None, :] <= pos_q_BxS[:, :, None]
    if window is not None:
        ok_BxSxT &= jnp.abs(pos_q_BxS[:, :, None] - pos_k_BxT[:, None, :]) < window
    return ok_BxSxT


def _logits(q_BxSxGxRxK, k_BxTxGxK, ok_BxSxT, scale):
    s = jnp.einsum("bsgrk,btgk->bgrst", q_BxSxGxRxK, k_BxTxGxK,
                   preferred_element_type=jnp.float32) * scale
    return jnp.where(ok_BxSxT[:, None, None], s, MASKED)


def _hop(x, axis, size):
    """x from the previous device of the ring (this device's goes to the next)."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % size) for i in range(size)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(causal, window, scale, axis, size, q, k, v, pos, seg):
    return _ring_fwd(causal, window, scale, axis, size, q, k, v, pos, seg)[0]


def _ring_fwd(causal, window, scale, axis, size, q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, pos_BxS,
              seg_BxS):
    B, S, H, K = q_BxSxHxK.shape
    G = k_BxTxGxK.shape[2]
    q = q_BxSxHxK.reshape(B, S, G, H // G, K)
    out_BxSxGxRxV = jnp.zeros(q.shape[:-1] + (v_BxTxGxV.shape[-1],), jnp.float32)
    lse_BxGxRxS = jnp.full((B, G, H // G, S), -jnp.inf, jnp.float32)
    block = (k_BxTxGxK, v_BxTxGxV, pos_BxS, seg_BxS)
    for step in range(size):
        k, v, pos_k, seg_k = block
        if step + 1 < size:  # the next block is sent on before this one's math: they overlap
            block = tuple(_hop(x, axis, size) for x in block)
        s = _logits(q, k, _allowed(causal, window, pos_BxS, seg_BxS, pos_k, seg_k), scale)
        block_lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - block_lse[..., None])
        block_out = jnp.einsum("bgrst,btgv->bsgrv", p, v.astype(jnp.float32))
        new_lse = jnp.logaddexp(lse_BxGxRxS, block_lse)
        old_w = jnp.exp(lse_BxGxRxS - new_lse).transpose(0, 3, 1, 2)[..., None]
        new_w = jnp.exp(block_lse - new_lse).transpose(0, 3, 1, 2)[..., None]
        out_BxSxGxRxV = out_BxSxGxRxV * old_w + block_out * new_w
        lse_BxGxRxS = new_lse
    out = out_BxSxGxRxV.reshape(B, S, H, -1).astype(q_BxSxHxK.dtype)
    return out, (q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, pos_BxS, seg_BxS, out, lse_BxGxRxS)


def _ring_bwd(causal, window, scale, axis, size, res, dout_BxSxHxV):
    q_BxSxHxK, k, v, pos_BxS, seg_BxS, out_BxSxHxV, lse_BxGxRxS = res
    B, S, H, K = q_BxSxHxK.shape
    G, V = k.shape[2], v.shape[-1]
    q = q_BxSxHxK.reshape(B, S, G, H // G, K)
    do = dout_BxSxHxV.reshape(B, S, G, H // G, V).astype(jnp.float32)
    delta_BxGxRxS = jnp.einsum("bsgrv,bsgrv->bgrs", do,
                               out_BxSxHxV.reshape(do.shape).astype(jnp.float32))
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    block = (k, v, pos_BxS, seg_BxS)
    for step in range(size):
        if step:  # dK, dV of the block just done travel with it
            dk, dv = _hop(dk, axis, size), _hop(dv, axis, size)
        k, v, pos_k, seg_k = block
        if step + 1 < size:
            block = tuple(_hop(x, axis, size) for x in block)
        ok = _allowed(causal, window, pos_BxS, seg_BxS, pos_k, seg_k)
        p = jnp.exp(_logits(q, k, ok, scale) - lse_BxGxRxS[..., None])
        dv = dv + jnp.einsum("bgrst,bsgrv->btgv", p, do)
        dp = jnp.einsum("bsgrv,btgv->bgrst", do, v.astype(jnp.float32))
        # a masked logit is a constant (where): no gradient flows to it
        ds = jnp.where(ok[:, None, None], p * (dp - delta_BxGxRxS[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bgrst,btgk->bsgrk", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("bgrst,bsgrk->btgk", ds, q.astype(jnp.float32))
    dk, dv = _hop(dk, axis, size), _hop(dv, axis, size)  # home: each block's owner
    return (dq.reshape(B, S, H, K).astype(q_BxSxHxK.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---- blocks through the flash kernel -------------------------------------------------------
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
    return jax.tree.map(lambda x: _hop(x, axis, size), block)  # None (no segments) stays


def _merge(acc_out_BxSxHxD, acc_lse_BxHxS, out_BxSxHxD, lse_BxHxS):
    """Two partial softmax results over disjoint keys -> their union's (rows seeing nothing in
    both stay at lse -inf, out 0)."""
    new_lse = jnp.logaddexp(acc_lse_BxHxS, lse_BxHxS)
    safe = jnp.where(jnp.isneginf(new_lse), 0.0, new_lse)
    weight = lambda lse: jnp.exp(lse - safe).transpose(0, 2, 1)[..., None]  # noqa: E731
    return (acc_out_BxSxHxD * weight(acc_lse_BxHxS)
            + out_BxSxHxD.astype(jnp.float32) * weight(lse_BxHxS)), new_lse


def _at_rows(part_BxCx___, first_half, axis=1, fill=0.0):
    """A half-length block placed in the first or second half of a full-length one."""
    blank = jnp.full_like(part_BxCx___, fill)
    return jnp.where(first_half, jnp.concatenate([part_BxCx___, blank], axis),
                     jnp.concatenate([blank, part_BxCx___], axis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash_ring(causal, scale, axis, size, q, k, v, seg):
    return _flash_ring_fwd(causal, scale, axis, size, q, k, v, seg)[0]


def _flash_ring_fwd(causal, scale, axis, size, q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS):
    from kernels_pallas.flash import flash_attention_with_lse
    flash = functools.partial(flash_attention_with_lse, sm_scale=scale)
    me = jax.lax.axis_index(axis)
    B, S, H, D = q_BxSxHxD.shape
    acc = (jnp.zeros((B, S, H, D), jnp.float32), jnp.full((B, H, S), -jnp.inf, jnp.float32))
    block = (k_BxSxGxD, v_BxSxGxD, seg_BxS)
    for step in range(size):
        k, v, seg_k = block
        if step + 1 < size:
            block = _hops(block, axis, size)
        if step == 0 or not causal:
            out, lse = flash(q_BxSxHxD, k, v, causal=causal and step == 0, segment_ids=seg_BxS,
                             kv_segment_ids=seg_k)
            acc = _merge(*acc, out, lse)
            continue
        earlier = (me - step) % size < me
        x, b, a = _halves(earlier, S)
        out, lse = flash(_stack2(x(q_BxSxHxD), b(q_BxSxHxD)), _stack2(a(k), x(k)),
                         _stack2(a(v), x(v)), causal=False,
                         segment_ids=_stack2(x(seg_BxS), b(seg_BxS)),
                         kv_segment_ids=_stack2(a(seg_k), x(seg_k)))
        for rows_x, part in ((earlier, slice(None, B)), (False, slice(B, None))):
            acc = _merge(*acc, _at_rows(out[part], rows_x),
                         _at_rows(lse[part], rows_x, axis=2, fill=-jnp.inf))
    out_BxSxHxD = acc[0].astype(q_BxSxHxD.dtype)
    return out_BxSxHxD, (q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, seg_BxS, out_BxSxHxD, acc[1])


def _flash_ring_bwd(causal, scale, axis, size, res, dout_BxSxHxD):
    from kernels_pallas.flash import flash_attention_block_grads
    grads = functools.partial(flash_attention_block_grads, sm_scale=scale)
    q, k, v, seg, out, lse_BxHxS = res
    me = jax.lax.axis_index(axis)
    B = q.shape[0]
    do = dout_BxSxHxD.astype(q.dtype)
    delta_BxHxS = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    block = (k, v, seg)
    for step in range(size):
        if step:  # dK, dV of the block just done travel with it
            dk, dv = _hop(dk, axis, size), _hop(dv, axis, size)
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
    dk, dv = _hop(dk, axis, size), _hop(dv, axis, size)  # home: each block's owner
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash_ring.defvjp(_flash_ring_fwd, _flash_ring_bwd)
