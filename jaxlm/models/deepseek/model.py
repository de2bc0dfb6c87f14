"""DeepSeek-V3-style decoder: embedding; `num_dense_layers` blocks of MLA + SwiGLU MLP, then
MLA + MoE blocks (sigmoid routing, selection bias balancing, shared experts); RMSNorm; head.
The two kinds of layers are two stacks run in a chain."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.decoder import TokenLM
from jaxlm.models.deepseek.config import DeepseekConfig
from jaxlm.nn import stack
from jaxlm.nn.block import Block, BlockConfig
from jaxlm.nn.mla import MLAConfig
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.moe import MoEConfig
from jaxlm.nn.norms import RMSNorm
from jaxlm.nn.param import scaled_out_std
from jaxlm.nn.rope import RopeScaling


class Deepseek(TokenLM):
    def __init__(self, cfg: DeepseekConfig, rngs: nnx.Rngs):
        self.init_embedding(cfg, rngs)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        D, std = cfg.d_model, cfg.init_std
        out_std = scaled_out_std(std, cfg.num_layers)
        mla = MLAConfig(D, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                        cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.rope_theta, cfg.norm_eps,
                        causal=True, impl=cfg.attention_impl, std=std, out_std=out_std, dtype=dt,
                        param_dtype=pdt, rope_scaling=RopeScaling.of(cfg))
        if cfg.num_dense_layers:
            dense = BlockConfig(D, mla, MLPConfig(D, cfg.ffn_dim, std, out_std, dt, pdt),
                                cfg.norm_eps, pdt)
            self.dense_layers = stack.build(self.stack_config(cfg.num_dense_layers),
                                            lambda r: Block(dense, r), rngs)
        moe = BlockConfig(D, mla, MoEConfig.of(cfg, D, cfg.ffn_dim, std, out_std, dt, pdt,
                                               cfg.num_units), cfg.norm_eps, pdt)
        self.layers = stack.build(self.stack_config(), lambda r: Block(moe, r), rngs)
        self.final_norm = RMSNorm(D, cfg.norm_eps, pdt)
        self.init_head(rngs)

    def stack(self):
        moe = stack.Stack(self.stack_config(), self.layers)
        if not self.cfg.num_dense_layers:
            return moe
        return stack.Chain([stack.Stack(self.stack_config(self.cfg.num_dense_layers),
                                        self.dense_layers), moe])
