"""Parameters with logical axis names.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names; the rules
table (jaxlm.parallel.sharding) decides what they mean on a mesh. Parameters are stored in
`param_dtype` and cast to the compute `dtype` where they are used.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


def ones_param(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def zeros_param(shape, names, dtype) -> nnx.Param:
    """Biases start at zero. Name them `b_*` (or `bias`): the optimizer does not decay them."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def scaled_out_std(std: float, num_layers: int) -> float:
    """Residual-branch output projections start smaller so the residual stream's variance does not
    grow with depth (GPT-2 / Megatron init)."""
    return std / math.sqrt(2 * num_layers)
