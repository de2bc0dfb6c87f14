"""Symmetric absmax int8 rounding of cached vectors: what the dense KVCache (jaxlm.nn.kv_cache)
and the serving pages (jaxlm.nn.paged_cache) store, so both caches hold the same numbers."""
from __future__ import annotations

import jax.numpy as jnp

INT8_MAX = 127.0


def quantize(x_xK):
    """Over the last dim: (int8 values, float32 scale [...]) with x ~= values * scale."""
    x = x_xK.astype(jnp.float32)
    scale_x = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale_x > 0, scale_x, 1.0)  # an all-zero vector stays zero
    q = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale_x


def store(write, values, scales, new_xK):
    """(values, scales) after `write(buffer, x)` puts the new vectors in: rounded to int8 with
    their scales where the cache keeps scales, as they are otherwise; (None, None) for a buffer
    the cache does not keep (shared values)."""
    if values is None:
        return None, None
    if scales is None:
        return write(values, new_xK), None
    q_xK, scale_x = quantize(new_xK)
    return write(values, q_xK), write(scales, scale_x)
