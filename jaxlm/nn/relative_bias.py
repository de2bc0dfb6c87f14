"""T5's bucketed relative position bias: a learned [buckets, heads] table, looked up by the
bucket of (key index - query index) and added to the attention logits. Exact buckets for short
distances, logarithmic ones up to `max_distance`, one bucket beyond; bidirectional stacks (the
encoder) give the two directions separate halves of the buckets."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.param import param


@dataclasses.dataclass(frozen=True)
class RelativeBiasConfig:
    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    std: float
    param_dtype: jnp.dtype


def relative_bucket(relative_SxT, bidirectional: bool, num_buckets: int, max_distance: int):
    """Bucket ids (int32) of key - query offsets, as in T5 (and transformers' T5Attention)."""
    buckets = jnp.zeros_like(relative_SxT)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_SxT > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_SxT)
    else:
        distance = -jnp.minimum(relative_SxT, 0)
    max_exact = num_buckets // 2
    # log buckets for distances >= max_exact (guarded against log(0); those use the exact ones)
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class RelativeBias(nnx.Module):
    def __init__(self, c: RelativeBiasConfig, rngs: nnx.Rngs):
        self.table = param(rngs, (c.num_buckets, c.num_heads), (None, "heads"), c.std,
                           c.param_dtype)
        self.c = c

    def __call__(self, q_index_S, k_index_T):
        """Bias [1, H, S, T] (fp32) for queries at key-sequence indices q_index_S, or [B, H, S, T]
        for per-row indices q_index_BxS (decoding: each row's queries at their own positions)."""
        c = self.c
        buckets_xSxT = relative_bucket(k_index_T - q_index_S[..., None], c.bidirectional,
                                       c.num_buckets, c.max_distance)
        bias_xSxTxH = jnp.take(self.table[...].astype(jnp.float32), buckets_xSxT, axis=0)
        bias_xHxSxT = jnp.moveaxis(bias_xSxTxH, -1, -3)
        return bias_xHxSxT if q_index_S.ndim == 2 else bias_xHxSxT[None]
