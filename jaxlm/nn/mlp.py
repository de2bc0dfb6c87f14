"""The dense feed-forward: SwiGLU, down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.param import param
from jaxlm.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    d_model: int
    ffn_dim: int
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype


class MLP(nnx.Module):
    """gate/up column-parallel ('mlp' on `tensor`), down row-parallel back to embed."""

    def __init__(self, c: MLPConfig, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (c.d_model, c.ffn_dim), ("embed", "mlp"), c.std, c.param_dtype)
        self.w_up = param(rngs, (c.d_model, c.ffn_dim), ("embed", "mlp"), c.std, c.param_dtype)
        self.w_down = param(rngs, (c.ffn_dim, c.d_model), ("mlp", "embed"), c.out_std,
                            c.param_dtype)
        self.dtype = c.dtype

    def __call__(self, x_BxSxD):
        dt = self.dtype
        gate_BxSxF = jnp.einsum("bsd,df->bsf", x_BxSxD, self.w_gate[...].astype(dt))
        up_BxSxF = jnp.einsum("bsd,df->bsf", x_BxSxD, self.w_up[...].astype(dt))
        h_BxSxF = constrain(jax.nn.silu(gate_BxSxF) * up_BxSxF, ("act_batch", "act_seq", "act_mlp"))
        return jnp.einsum("bsf,fd->bsd", h_BxSxF, self.w_down[...].astype(dt))
