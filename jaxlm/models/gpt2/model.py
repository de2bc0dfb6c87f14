"""GPT-2: token + learned position embeddings, N x pre-norm Block (LayerNorm, attention with
biases, LayerNorm, GELU(tanh) MLP with biases), final LayerNorm, head tied to the token table."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.decoder import TokenLM
from jaxlm.models.gpt2.config import GPT2Config
from jaxlm.nn import stack
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import Block, BlockConfig
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.norms import LayerNorm
from jaxlm.nn.param import param, scaled_out_std
from jaxlm.parallel.sharding import constrain


class GPT2(TokenLM):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.init_embedding(cfg, rngs)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        D, std = cfg.d_model, cfg.init_std
        self.positions = param(rngs, (cfg.max_positions, D), (None, "embed"), std / 2, pdt)
        out_std = scaled_out_std(std, cfg.num_layers)
        attention = AttentionConfig(D, cfg.num_heads, cfg.num_heads, D // cfg.num_heads,
                                    rope_theta=None, causal=True, sliding_window=None,
                                    impl=cfg.attention_impl, std=std, out_std=out_std, dtype=dt,
                                    param_dtype=pdt, qkv_bias=True, o_bias=True)
        mlp = MLPConfig(D, cfg.resolved_ffn_dim, std, out_std, dt, pdt, activation="gelu_tanh",
                        gated=False, bias=True)
        block = BlockConfig(D, attention, mlp, cfg.norm_eps, pdt, norm="layer")
        self.layers = stack.build(self.stack_config(), lambda r: Block(block, r), rngs)
        self.final_norm = LayerNorm(D, cfg.norm_eps, pdt)
        self.init_head(rngs)

    def add_to_embedding(self, h_BxSxD, positions_BxS):
        table_PxD = constrain(self.positions[...], (None, None))
        return h_BxSxD + jnp.take(table_PxD, positions_BxS, axis=0)
