"""The dense feed-forward: gated (SwiGLU, GeGLU: down(act(gate(x)) * up(x))) or plain
(down(act(up(x))), GPT-2/BERT), with or without biases."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.fp8 import amax_state, site
from jaxlm.nn.param import param, project, zeros_param
from jaxlm.parallel.sharding import constrain

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf (BERT)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2, T5 "gelu_new"
    "relu": jax.nn.relu,  # the original T5
}


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    d_model: int
    ffn_dim: int
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    activation: str = "silu"
    gated: bool = True
    bias: bool = False


class MLP(nnx.Module):
    """gate/up column-parallel ('mlp' on `tensor`), down row-parallel back to embed."""

    def __init__(self, c: MLPConfig, rngs: nnx.Rngs):
        D, F, pdt = c.d_model, c.ffn_dim, c.param_dtype
        if c.gated:
            self.w_gate = param(rngs, (D, F), ("embed", "mlp"), c.std, pdt)
        self.w_up = param(rngs, (D, F), ("embed", "mlp"), c.std, pdt)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), c.out_std, pdt)
        self.fp8_amax = amax_state(3)  # up, gate, down (delayed fp8 scaling only)
        if c.bias:
            if c.gated:
                self.b_gate = zeros_param((F,), ("mlp",), pdt)
            self.b_up = zeros_param((F,), ("mlp",), pdt)
            self.b_down = zeros_param((D,), ("embed",), pdt)
        self.c = c

    def __call__(self, x_BxSxD):
        c, dt = self.c, self.c.dtype
        act = ACTIVATIONS[c.activation]
        up_BxSxF = self._project(x_BxSxD, "up")
        h_BxSxF = act(self._project(x_BxSxD, "gate")) * up_BxSxF if c.gated else act(up_BxSxF)
        h_BxSxF = constrain(h_BxSxF, ("act_batch", "act_seq", "act_mlp"))
        y_BxSxD = project("bsf,fd->bsd", h_BxSxF, self.w_down, dt,
                          amax_2xH=site(self.fp8_amax, 2))
        return y_BxSxD + self.b_down[...].astype(dt) if c.bias else y_BxSxD

    def _project(self, x_BxSxD, name):
        dt = self.c.dtype
        # fp8 sites: up 0, gate 1 (it multiplies up's input), down 2
        amax_2xH = site(self.fp8_amax, 0) if name == "up" else site(self.fp8_amax, 1, input_of=0)
        y_BxSxF = project("bsd,df->bsf", x_BxSxD, getattr(self, f"w_{name}"), dt,
                          amax_2xH=amax_2xH)
        return y_BxSxF + getattr(self, f"b_{name}")[...].astype(dt) if self.c.bias else y_BxSxF
