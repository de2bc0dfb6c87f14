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

from jaxlm.nn.visibility import MASKED, visible
from jaxlm.parallel.sharding import logical_to_spec


def ring_attention(q_BxSxHxK, k_BxSxGxK, v_BxSxGxV, positions_BxS, segment_ids_BxS, *,
                   causal: bool, sliding_window: int | None, scale: float, mesh, rules):
    """Self-attention with the sequence split over the mesh axis the rules give `act_seq`
    (batch and heads split as the activation rules split them), each block in jnp and masked
    by positions, so rows may be in any token order (it holds a block's [S_local, S_local]
    logits; jaxlm/parallel/flash_context.py runs the blocks through the flash kernel).
    Returns [B, S, H, V]."""
    q_spec, kv_spec, row_spec, axis, size = sequence_specs(mesh, rules)
    if segment_ids_BxS is None:
        segment_ids_BxS = jnp.ones(q_BxSxHxK.shape[:2], jnp.int32)
    local = functools.partial(_ring, causal, sliding_window, scale, axis, size)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                         out_specs=q_spec, check_vma=False)(
        q_BxSxHxK, k_BxSxGxK, v_BxSxGxV, positions_BxS.astype(jnp.int32),
        segment_ids_BxS.astype(jnp.int32))


def sequence_specs(mesh, rules):
    """(q spec, kv spec, [B, S] row spec, the sequence's mesh axis, devices on it) for
    attention run per device with the sequence split."""
    q_spec = logical_to_spec(("act_batch", "act_seq", "act_heads", None), rules, mesh)
    kv_spec = logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None), rules, mesh)
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"context parallel attention needs kv heads split like q heads "
                         f"(act_heads -> {q_spec[2]}, act_kv_heads -> {kv_spec[2]})")
    axis = q_spec[1]
    size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    return q_spec, kv_spec, P(q_spec[0], axis), axis, size


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


def _logits(q_BxSxGxRxK, k_BxTxGxK, ok_BxSxT, scale):
    s = jnp.einsum("bsgrk,btgk->bgrst", q_BxSxGxRxK, k_BxTxGxK,
                   preferred_element_type=jnp.float32) * scale
    return jnp.where(ok_BxSxT[:, None, None], s, MASKED)


def nothing_seen(B: int, S: int, H: int, V: int):
    """The (out, lse) merge_partials starts from: rows that have seen no key yet."""
    return jnp.zeros((B, S, H, V), jnp.float32), jnp.full((B, H, S), -jnp.inf, jnp.float32)


def merge_partials(acc_out_BxSxHxV, acc_lse_BxHxS, out_BxSxHxV, lse_BxHxS):
    """Two partial softmax results over disjoint keys -> their union's, in float32 (rows that
    have seen nothing in both stay at lse -inf and out 0)."""
    new_lse = jnp.logaddexp(acc_lse_BxHxS, lse_BxHxS)
    safe = jnp.where(jnp.isneginf(new_lse), 0.0, new_lse)
    weight = lambda lse: jnp.exp(lse - safe).transpose(0, 2, 1)[..., None]  # noqa: E731
    return (acc_out_BxSxHxV * weight(acc_lse_BxHxS)
            + out_BxSxHxV.astype(jnp.float32) * weight(lse_BxHxS)), new_lse


def hop(x, axis, size):
    """x from the previous device of the ring (this device's goes to the next)."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % size) for i in range(size)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(causal, window, scale, axis, size, q, k, v, pos, seg):
    return _ring_fwd(causal, window, scale, axis, size, q, k, v, pos, seg)[0]


def _ring_fwd(causal, window, scale, axis, size, q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, pos_BxS,
              seg_BxS):
    B, S, H, K = q_BxSxHxK.shape
    G, V = k_BxTxGxK.shape[2], v_BxTxGxV.shape[-1]
    q = q_BxSxHxK.reshape(B, S, G, H // G, K)
    acc = nothing_seen(B, S, H, V)
    block = (k_BxTxGxK, v_BxTxGxV, pos_BxS, seg_BxS)
    for step in range(size):
        k, v, pos_k, seg_k = block
        if step + 1 < size:  # the next block is sent on before this one's math: they overlap
            block = tuple(hop(x, axis, size) for x in block)
        s = _logits(q, k, visible(causal, window, pos_BxS, pos_k, seg_BxS, seg_k), scale)
        block_lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - block_lse[..., None])
        block_out = jnp.einsum("bgrst,btgv->bsgrv", p, v.astype(jnp.float32))
        acc = merge_partials(*acc, block_out.reshape(B, S, H, V), block_lse.reshape(B, H, S))
    out = acc[0].astype(q_BxSxHxK.dtype)
    return out, (q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, pos_BxS, seg_BxS, out, acc[1])


def _ring_bwd(causal, window, scale, axis, size, res, dout_BxSxHxV):
    q_BxSxHxK, k, v, pos_BxS, seg_BxS, out_BxSxHxV, lse_BxHxS = res
    B, S, H, K = q_BxSxHxK.shape
    G, V = k.shape[2], v.shape[-1]
    lse_BxGxRxS = lse_BxHxS.reshape(B, G, H // G, S)
    q = q_BxSxHxK.reshape(B, S, G, H // G, K)
    do = dout_BxSxHxV.reshape(B, S, G, H // G, V).astype(jnp.float32)
    delta_BxGxRxS = jnp.einsum("bsgrv,bsgrv->bgrs", do,
                               out_BxSxHxV.reshape(do.shape).astype(jnp.float32))
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    block = (k, v, pos_BxS, seg_BxS)
    for step in range(size):
        if step:  # dK, dV of the block just done travel with it
            dk, dv = hop(dk, axis, size), hop(dv, axis, size)
        k, v, pos_k, seg_k = block
        if step + 1 < size:
            block = tuple(hop(x, axis, size) for x in block)
        ok = visible(causal, window, pos_BxS, pos_k, seg_BxS, seg_k)
        p = jnp.exp(_logits(q, k, ok, scale) - lse_BxGxRxS[..., None])
        dv = dv + jnp.einsum("bgrst,bsgrv->btgv", p, do)
        dp = jnp.einsum("bsgrv,btgv->bgrst", do, v.astype(jnp.float32))
        # a masked logit is a constant (where): no gradient flows to it
        ds = jnp.where(ok[:, None, None], p * (dp - delta_BxGxRxS[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bgrst,btgk->bsgrk", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("bgrst,bsgrk->btgk", ds, q.astype(jnp.float32))
    dk, dv = hop(dk, axis, size), hop(dv, axis, size)  # home: each block's owner
    return (dq.reshape(B, S, H, K).astype(q_BxSxHxK.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
