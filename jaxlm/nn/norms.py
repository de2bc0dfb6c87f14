"""Normalisation layers, computed in fp32 whatever the activations' dtype: RMSNorm (Llama, T5,
DeepSeek: no mean subtraction, no bias) and LayerNorm (GPT-2, BERT: centred, with a bias)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.param import ones_param, zeros_param

NORMS = ("rms", "layer")


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = ones_param((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x_BxSxD):
        x32 = x_BxSxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x_BxSxD.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = ones_param((dim,), ("norm",), param_dtype)
        self.bias = zeros_param((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x_BxSxD):
        x32 = x_BxSxD.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        y = centred * inv_std * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
            jnp.float32)
        return y.astype(x_BxSxD.dtype)


def make_norm(kind: str, dim: int, eps: float, param_dtype) -> nnx.Module:
    if kind == "rms":
        return RMSNorm(dim, eps, param_dtype)
    if kind == "layer":
        return LayerNorm(dim, eps, param_dtype)
    raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")
