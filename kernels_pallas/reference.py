"""Plain-jnp attention in float32: the ground truth every flash kernel is tested against.

It materialises the [B, H, S, S] logits, so it is for tests and small checks only."""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible_BxSxT(S: int, *, causal: bool, segment_ids_BxS=None, sliding_window=None,
                  kv_segment_ids_BxT=None):
    """Which key each query may see: [B or 1, S, S] bool.

    causal: key position <= query position. sliding_window W: |query - key| < W (with causal this
    is the last W keys up to and including the query). segment_ids: same document only (the
    keys' ids are kv_segment_ids where given)."""
    q_S1 = jnp.arange(S)[:, None]
    k_1T = jnp.arange(S)[None, :]
    vis_SxT = jnp.ones((S, S), bool)
    if causal:
        vis_SxT &= k_1T <= q_S1
    if sliding_window is not None:
        vis_SxT &= jnp.abs(q_S1 - k_1T) < sliding_window
    vis_BxSxT = vis_SxT[None]
    if segment_ids_BxS is not None:
        kv_seg_BxT = segment_ids_BxS if kv_segment_ids_BxT is None else kv_segment_ids_BxT
        vis_BxSxT = vis_BxSxT & (segment_ids_BxS[:, :, None] == kv_seg_BxT[:, None, :])
    return vis_BxSxT


def attention_reference(q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, *, causal=True, segment_ids=None,
                        sm_scale=None, sliding_window=None, kv_segment_ids=None):
    """Returns (out [B, S, H, D] in q's dtype, lse [B, H, S] float32, natural log)."""
    B, S, H, D = q_BxSxHxD.shape
    G = k_BxSxGxD.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    q = q_BxSxHxD.astype(jnp.float32).reshape(B, S, G, H // G, D)
    k = k_BxSxGxD.astype(jnp.float32)
    v = v_BxSxGxD.astype(jnp.float32)
    logits_BxGxRxSxT = jnp.einsum("bsgrd,btgd->bgrst", q, k,
                                  precision=jax.lax.Precision.HIGHEST) * scale
    vis = visible_BxSxT(S, causal=causal, segment_ids_BxS=segment_ids,
                        sliding_window=sliding_window, kv_segment_ids_BxT=kv_segment_ids)
    logits_BxGxRxSxT = jnp.where(vis[:, None, None], logits_BxGxRxSxT, MASK_VALUE)
    lse_BxGxRxS = jax.nn.logsumexp(logits_BxGxRxSxT, axis=-1)
    probs = jnp.exp(logits_BxGxRxSxT - lse_BxGxRxS[..., None])
    out = jnp.einsum("bgrst,btgd->bsgrd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return (out.reshape(B, S, H, D).astype(q_BxSxHxD.dtype),
            lse_BxGxRxS.reshape(B, H, S))
