"""BERT: token + learned position + token-type embeddings and a LayerNorm, N x Block
(bidirectional attention with biases, GELU MLP with biases; post-norm as in the original, or
pre-norm with a final LayerNorm), and the masked-LM head (dense + GELU + LayerNorm, decoder tied
to the token table, plus a bias)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.bert.config import BertConfig
from jaxlm.models.decoder import TokenLM
from jaxlm.nn import stack
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import Block, BlockConfig
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.norms import LayerNorm
from jaxlm.nn.param import param, scaled_out_std, zeros_param
from jaxlm.parallel.sharding import constrain


class Bert(TokenLM):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.init_embedding(cfg, rngs)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        D, std = cfg.d_model, cfg.init_std
        self.positions = param(rngs, (cfg.max_positions, D), (None, "embed"), std, pdt)
        self.token_types = param(rngs, (cfg.type_vocab_size, D), (None, "embed"), std, pdt)
        self.embed_norm = LayerNorm(D, cfg.norm_eps, pdt)
        out_std = scaled_out_std(std, cfg.num_layers)
        attention = AttentionConfig(D, cfg.num_heads, cfg.num_heads, D // cfg.num_heads,
                                    rope_theta=None, causal=False, sliding_window=None,
                                    impl=cfg.attention_impl, std=std, out_std=out_std, dtype=dt,
                                    param_dtype=pdt, qkv_bias=True, o_bias=True)
        mlp = MLPConfig(D, cfg.ffn_dim, std, out_std, dt, pdt, activation="gelu", gated=False,
                        bias=True)
        block = BlockConfig(D, attention, mlp, cfg.norm_eps, pdt, post_norm=not cfg.pre_norm,
                            norm="layer")
        self.layers = stack.build(self.stack_config(), lambda r: Block(block, r), rngs)
        if cfg.pre_norm:
            self.final_norm = LayerNorm(D, cfg.norm_eps, pdt)
        self.mlm_w = param(rngs, (D, D), ("embed", None), std, pdt)
        self.mlm_b = zeros_param((D,), (None,), pdt)
        self.mlm_norm = LayerNorm(D, cfg.norm_eps, pdt)
        self.b_vocab = zeros_param((cfg.vocab_size,), ("vocab",), pdt)
        self.init_head(rngs)

    def add_to_embedding(self, h_BxSxD, positions_BxS):
        positions_PxD = constrain(self.positions[...], (None, None))
        h_BxSxD = h_BxSxD + jnp.take(positions_PxD, positions_BxS, axis=0)
        return self.embed_norm(h_BxSxD + self.token_types[0])  # every token is of type 0

    def logits(self, h_BxSxD):
        """The masked-LM head over every position (the loss keeps the masked ones)."""
        dt = self.dtype
        if self.cfg.pre_norm:
            h_BxSxD = self.final_norm(h_BxSxD)
        t_BxSxD = jnp.einsum("bsd,de->bse", h_BxSxD, self.mlm_w[...].astype(dt))
        t_BxSxD = self.mlm_norm(jax.nn.gelu(t_BxSxD + self.mlm_b[...].astype(dt),
                                            approximate=False))
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_BxSxV = (jnp.einsum("bsd,dv->bsv", t_BxSxD, w_DxV.astype(dt))
                        + self.b_vocab[...].astype(dt))
        return constrain(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))
