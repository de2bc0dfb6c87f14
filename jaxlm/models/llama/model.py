"""Llama-style decoder: embedding, N x Block (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU),
RMSNorm, head. A thin assembly of jaxlm.nn layers behind the model protocol
(jaxlm/models/protocol.py): `embed_tokens`, `stack()`, `logits`."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.llama.config import LlamaConfig
from jaxlm.nn import stack
from jaxlm.nn.attention import AttentionConfig
from jaxlm.nn.block import RESIDUAL, Block, BlockConfig, LayerInputs
from jaxlm.nn.mlp import MLPConfig
from jaxlm.nn.norms import RMSNorm
from jaxlm.nn.param import param, scaled_out_std
from jaxlm.parallel.sharding import constrain


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
        blocks = self.unit_blocks()
        make_unit = ((lambda r: Block(blocks[0], r)) if len(blocks) == 1 else
                     (lambda r: stack.Group(blocks, r)))
        self.layers = stack.build(self.stack_config(), make_unit, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                cfg.init_std, pdt)
        self.dtype = dt

    # ---------------------------------------------------------------- assembly

    def stack_config(self) -> stack.StackConfig:
        c = self.cfg
        return stack.StackConfig(c.num_units, c.scan_layers, c.scan_unroll, c.remat)

    def unit_blocks(self) -> list[BlockConfig]:
        """The blocks of one stack unit: one dense block (families with other layer patterns
        override this)."""
        return [self.block_config(self.mlp_config())]

    def block_config(self, ffn) -> BlockConfig:
        c = self.cfg
        attention = AttentionConfig(
            c.d_model, c.num_heads, c.num_kv_heads, c.resolved_head_dim, rope_theta=c.rope_theta,
            causal=True, sliding_window=None, impl=c.attention_impl, std=c.init_std,
            out_std=self.out_std, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        return BlockConfig(c.d_model, attention, ffn, c.norm_eps, jnp.dtype(c.param_dtype))

    def mlp_config(self) -> MLPConfig:
        c = self.cfg
        return MLPConfig(c.d_model, c.ffn_dim, c.init_std, self.out_std, jnp.dtype(c.dtype),
                         jnp.dtype(c.param_dtype))

    @property
    def out_std(self) -> float:
        return scaled_out_std(self.cfg.init_std, self.cfg.num_layers)

    # ---------------------------------------------------------------- the model protocol

    def embed_tokens(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        """(residual stream [B, S, D], what every block reads)."""
        B, S = tokens_BxS.shape
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        # Gather the table's embed dim before the lookup (FSDP's all-gather): a lookup into a
        # table sharded on embed would force the batch-sharded gradient to be resharded.
        table_VxD = constrain(self.embed[...], ("vocab", None))
        h_BxSxD = constrain(jnp.take(table_VxD, tokens_BxS, axis=0).astype(self.dtype), RESIDUAL)
        return h_BxSxD, LayerInputs(positions_BxS, segment_ids_BxS)

    def stack(self) -> stack.Stack:
        return stack.Stack(self.stack_config(), self.layers)

    def logits(self, h_BxSxD):
        """The head: logits [B, S, V] in the compute dtype (the loss upcasts)."""
        h_BxSxD = self.final_norm(h_BxSxD)
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_BxSxV = jnp.einsum("bsd,dv->bsv", h_BxSxD, w_DxV.astype(self.dtype))
        return constrain(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        h_BxSxD, inputs = self.embed_tokens(tokens_BxS, positions_BxS, segment_ids_BxS)
        h_BxSxD, _, _ = self.stack()(h_BxSxD, inputs)
        return self.logits(h_BxSxD)
