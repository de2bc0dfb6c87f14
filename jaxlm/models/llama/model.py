"""Llama-style decoder: embedding, N x Block (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU),
RMSNorm, head. A thin assembly of jaxlm.nn layers behind the model protocol
(jaxlm/models/protocol.py), with what decoders share in jaxlm/models/decoder.py."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.decoder import TokenLM
from jaxlm.models.llama.config import LlamaConfig
from jaxlm.nn import stack
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import Block, BlockConfig
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.norms import RMSNorm
from jaxlm.nn.param import scaled_out_std
from jaxlm.nn.rope import RopeScaling


class Llama(TokenLM):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.init_embedding(cfg, rngs)
        blocks = self.unit_blocks()
        make_unit = ((lambda r: Block(blocks[0], r)) if len(blocks) == 1 else
                     (lambda r: stack.Group(blocks, r)))
        self.layers = stack.build(self.stack_config(), make_unit, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))
        self.init_head(rngs)

    def unit_blocks(self) -> list[BlockConfig]:
        """The blocks of one stack unit: one dense block (families with other layer patterns
        override this)."""
        return [self.block_config(self.mlp_config())]

    def block_config(self, ffn) -> BlockConfig:
        c = self.cfg
        attention = AttentionConfig(
            c.d_model, c.num_heads, c.num_kv_heads, c.resolved_head_dim, rope_theta=c.rope_theta,
            causal=True, sliding_window=c.sliding_window or None, impl=c.attention_impl,
            std=c.init_std, out_std=self.out_std, dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype), qkv_bias=c.qkv_bias,
            rope_scaling=RopeScaling.of(c))
        return BlockConfig(c.d_model, attention, ffn, c.norm_eps, jnp.dtype(c.param_dtype))

    def mlp_config(self) -> MLPConfig:
        c = self.cfg
        return MLPConfig(c.d_model, c.ffn_dim, c.init_std, self.out_std, jnp.dtype(c.dtype),
                         jnp.dtype(c.param_dtype))

    @property
    def out_std(self) -> float:
        return scaled_out_std(self.cfg.init_std, self.cfg.num_layers)
