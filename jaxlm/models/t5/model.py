"""T5 v1.1: a shared token table; an encoder stack (RMSNorm pre-norm blocks, bidirectional
attention with the encoder's relative position bias, gated-GELU MLP, or the original T5's plain
ReLU MLP) with a final norm; a decoder stack (causal self-attention with its own relative bias,
cross-attention over the encoder output, the same MLP) with a final norm; a head (untied in v1.1;
tied: the output scaled by d^-1/2 as in the original T5). T5 does not scale attention logits
by 1/sqrt(d_kv).

Protocol: `encode` runs the encoder once; the decoder is the decoder-only protocol
(`embed_tokens` with the encoder output as memory, `stack()`, `logits`), so decoding (KV cache,
cross-attention over a fixed memory) reuses it: the decoder blocks cache the memory's projected
keys/values on the first cached call (jaxlm/nn/block.py)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.decoder import TokenLM
from jaxlm.models.t5.config import T5Config
from jaxlm.nn import stack
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import Block, BlockConfig, LayerInputs
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.norms import RMSNorm
from jaxlm.nn.param import project, scaled_out_std
from jaxlm.nn.relative_bias import RelativeBias, RelativeBiasConfig
from jaxlm.parallel.sharding import constrain


class T5(TokenLM):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.init_embedding(cfg, rngs)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        D, std = cfg.d_model, cfg.init_std
        out_std = scaled_out_std(std, cfg.num_layers + cfg.decoder_layers)

        def attention(causal):
            return AttentionConfig(D, cfg.num_heads, cfg.num_heads, cfg.head_dim, rope_theta=None,
                                   causal=causal, sliding_window=None, impl=cfg.attention_impl,
                                   std=std, out_std=out_std, dtype=dt, param_dtype=pdt, scale=1.0)

        def bias(bidirectional):
            return RelativeBias(RelativeBiasConfig(cfg.num_heads, cfg.relative_buckets,
                                                   cfg.relative_max_distance, bidirectional, std,
                                                   pdt), rngs)
        mlp = MLPConfig(D, cfg.ffn_dim, std, out_std, dt, pdt, activation=cfg.ffn_activation,
                        gated=cfg.gated_ffn)
        encoder_block = BlockConfig(D, attention(False), mlp, cfg.norm_eps, pdt)
        decoder_block = BlockConfig(D, attention(True), mlp, cfg.norm_eps, pdt,
                                    cross_attention=attention(False))
        self.encoder_bias = bias(True)
        self.encoder_layers = stack.build(self.stack_config(cfg.num_layers),
                                          lambda r: Block(encoder_block, r), rngs)
        self.encoder_norm = RMSNorm(D, cfg.norm_eps, pdt)
        self.decoder_bias = bias(False)
        self.layers = stack.build(self.stack_config(cfg.decoder_layers),
                                  lambda r: Block(decoder_block, r), rngs)
        self.final_norm = RMSNorm(D, cfg.norm_eps, pdt)
        self.init_head(rngs)

    def encode(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        """(the encoder's output [B, S, D] after its final norm, the encoder stack's aux)."""
        positions_BxS = self.default_positions(tokens_BxS, positions_BxS)
        index_S = jnp.arange(tokens_BxS.shape[1])
        inputs = LayerInputs(positions_BxS, segment_ids_BxS,
                             attention_bias=self.encoder_bias(index_S, index_S))
        h_BxSxD, aux, _ = stack.Stack(self.stack_config(self.cfg.num_layers), self.encoder_layers)(
            self.token_embedding(tokens_BxS, positions_BxS), inputs)
        return self.encoder_norm(h_BxSxD), aux

    def embed_tokens(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, *,
                     memory_BxSxD=None, memory_segment_ids_BxS=None, cache_len=None):
        """The decoder's residual stream and what its blocks read (the encoder output as
        memory). `cache_len`: the tokens go into a self-attention cache of that many slots (slot
        = position), so the bias is of each row's queries at their positions over every slot."""
        positions_BxT = self.default_positions(tokens_BxT, positions_BxT)
        if cache_len is None:
            index_T = jnp.arange(tokens_BxT.shape[1])
            bias = self.decoder_bias(index_T, index_T)
        else:
            bias = self.decoder_bias(positions_BxT, jnp.arange(cache_len))
        inputs = LayerInputs(positions_BxT, segment_ids_BxT, memory_BxSxD, memory_segment_ids_BxS,
                             attention_bias=bias)
        return self.token_embedding(tokens_BxT, positions_BxT), inputs

    def stack(self) -> stack.Stack:
        return stack.Stack(self.stack_config(self.cfg.decoder_layers), self.layers)

    def logits(self, h_BxTxD):
        h_BxTxD = self.final_norm(h_BxTxD)
        if self.cfg.tie_embeddings:
            h_BxTxD = h_BxTxD * self.cfg.d_model ** -0.5
            logits_BxTxV = jnp.einsum("btd,dv->btv", h_BxTxD,
                                      self.embed[...].T.astype(self.dtype))
        else:
            logits_BxTxV = project("btd,dv->btv", h_BxTxD, self.head, self.dtype, fp8=False)
        return constrain(logits_BxTxV, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, tokens_BxS, decoder_tokens_BxT, positions_BxS=None, segment_ids_BxS=None,
                 decoder_positions_BxT=None, decoder_segment_ids_BxT=None):
        memory_BxSxD, _ = self.encode(tokens_BxS, positions_BxS, segment_ids_BxS)
        h_BxTxD, inputs = self.embed_tokens(decoder_tokens_BxT, decoder_positions_BxT,
                                            decoder_segment_ids_BxT, memory_BxSxD=memory_BxSxD,
                                            memory_segment_ids_BxS=segment_ids_BxS)
        h_BxTxD, _, _ = self.stack()(h_BxTxD, inputs)
        return self.logits(h_BxTxD)
