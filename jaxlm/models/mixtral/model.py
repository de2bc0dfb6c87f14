"""Mixtral-style decoder: Llama's assembly, with an MoE feed-forward in every `moe_every`-th
layer (the stack unit is then moe_every - 1 dense blocks and one MoE block)."""
from __future__ import annotations

from jaxlm.models.llama.model import Llama
from jaxlm.nn.block import BlockConfig
from jaxlm.nn.moe import MoEConfig


class Mixtral(Llama):
    def unit_blocks(self) -> list[BlockConfig]:
        c = self.cfg
        moe = MoEConfig.of(c, c.d_model, c.ffn_dim, c.init_std, self.out_std, c.dtype,
                           c.param_dtype, c.num_moe_layers)
        dense = self.block_config(self.mlp_config())
        return [dense] * (c.moe_every - 1) + [self.block_config(moe)]
