"""Mixtral-style decoder: Llama's assembly, with an MoE feed-forward in every `moe_every`-th
layer (the stack unit is then moe_every - 1 dense blocks and one MoE block)."""
from __future__ import annotations

import jax.numpy as jnp

from jaxlm.models.llama.model import Llama
from jaxlm.nn.block import BlockConfig
from jaxlm.nn.moe import MoEConfig


class Mixtral(Llama):
    def unit_blocks(self) -> list[BlockConfig]:
        c = self.cfg
        moe = MoEConfig(c.d_model, c.num_experts, c.experts_per_token,
                        c.expert_ffn_dim or c.ffn_dim, c.num_shared_experts, c.router, c.dispatch,
                        c.capacity_factor, c.init_std, self.out_std, jnp.dtype(c.dtype),
                        jnp.dtype(c.param_dtype), c.aux_loss_weight, c.z_loss_weight,
                        c.num_moe_layers)
        dense = self.block_config(self.mlp_config())
        return [dense] * (c.moe_every - 1) + [self.block_config(moe)]
