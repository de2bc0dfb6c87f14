"""Normalisation layers, computed in fp32 whatever the activations' dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.param import ones_param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = ones_param((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x_BxSxD):
        x32 = x_BxSxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x_BxSxD.dtype)
