"""Small building blocks: parameters with logical names, RMSNorm, RoPE, SwiGLU MLP.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names; the rules
table (jaxlm.sharding) decides what they mean on a mesh. Parameters are stored in `param_dtype` and
cast to the compute `dtype` where they are used.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.sharding import constrain


def param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


def ones_param(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = ones_param((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x_BxSxD):
        x32 = x_BxSxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x_BxSxD.dtype)


def rope(x_BxSxHxK, positions_BxS, theta: float):
    """Rotary embedding, rotate-half convention (as in Llama/HF), angles computed in fp32."""
    half = x_BxSxHxK.shape[-1] // 2
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang_BxSxK2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_K2
    cos = jnp.cos(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    sin = jnp.sin(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    x1, x2 = x_BxSxHxK[..., :half], x_BxSxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, d_model: int, ffn_dim: int, *, std: float, out_std: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std, param_dtype)
        self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std, param_dtype)
        self.w_down = param(rngs, (ffn_dim, d_model), ("mlp", "embed"), out_std, param_dtype)
        self.dtype = dtype

    def __call__(self, x_BxSxD):
        dt = self.dtype
        gate_BxSxF = jnp.einsum("bsd,df->bsf", x_BxSxD, self.w_gate[...].astype(dt))
        up_BxSxF = jnp.einsum("bsd,df->bsf", x_BxSxD, self.w_up[...].astype(dt))
        h_BxSxF = constrain(jax.nn.silu(gate_BxSxF) * up_BxSxF, ("act_batch", "act_seq", "act_mlp"))
        return jnp.einsum("bsf,fd->bsd", h_BxSxF, self.w_down[...].astype(dt))


def scaled_out_std(std: float, num_layers: int) -> float:
    """Residual-branch output projections start smaller so the residual stream's variance does not
    grow with depth (GPT-2 / Megatron init)."""
    return std / math.sqrt(2 * num_layers)
