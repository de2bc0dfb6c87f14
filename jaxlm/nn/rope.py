"""Rotary position embedding."""
from __future__ import annotations

import jax.numpy as jnp


def rope(x_BxSxHxK, positions_BxS, theta: float):
    """Rotary embedding, rotate-half convention (as in Llama/HF), angles computed in fp32."""
    half = x_BxSxHxK.shape[-1] // 2
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang_BxSxK2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_K2
    cos = jnp.cos(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    sin = jnp.sin(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    x1, x2 = x_BxSxHxK[..., :half], x_BxSxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
