"""Which keys a query sees, from token positions and segment ids: the one rule the attention
reference (jaxlm.nn.attend) and the jnp ring (jaxlm.parallel.ring) both mask by."""
from __future__ import annotations

import jax.numpy as jnp

MASKED = -1e30  # a finite "minus infinity": a fully masked row gives a uniform, not a NaN


def visible(causal: bool, window: int | None, q_pos, k_pos, q_seg_BxS=None, k_seg_BxT=None):
    """Boolean [B or 1, S, T]: query s sees key t when (causal) k_pos <= q_pos, (window W)
    |q_pos - k_pos| < W, and (segment ids) both are in one segment. Positions are [S] or [B, S]
    for queries, [T] or [B, T] for keys."""
    q_xSx1 = jnp.atleast_2d(q_pos)[:, :, None]
    k_xTx1 = jnp.atleast_2d(k_pos)[:, None, :]
    ok_BxSxT = jnp.ones((1, q_xSx1.shape[1], k_xTx1.shape[2]), bool)
    if causal:
        ok_BxSxT = ok_BxSxT & (k_xTx1 <= q_xSx1)
    if window is not None:
        ok_BxSxT = ok_BxSxT & (jnp.abs(q_xSx1 - k_xTx1) < window)
    if q_seg_BxS is not None:
        ok_BxSxT = ok_BxSxT & (q_seg_BxS[:, :, None] == k_seg_BxT[:, None, :])
    return ok_BxSxT
