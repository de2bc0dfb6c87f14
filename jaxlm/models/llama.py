"""Llama-style decoder: embedding, N x (RMSNorm, attention, RMSNorm, SwiGLU), RMSNorm, head.

The layer stack is either scanned (parameters stacked on a leading 'layers' axis, one compiled
body: fast compiles, and the 'layers' axis is what pipeline parallelism will split) or a plain
list of blocks. `remat` picks what the backward pass recomputes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.models.attention import Attention
from jaxlm.models.layers import MLP, RMSNorm, param, scaled_out_std
from jaxlm.sharding import constrain

ACT = ("act_batch", "act_res_seq", "act_embed")  # the residual stream between blocks

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What one decoder block needs (a layer takes its own small config, not the run's)."""
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float
    norm_eps: float
    attention: str
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @classmethod
    def from_model(cls, m: ModelConfig) -> "BlockConfig":
        return cls(m.d_model, m.num_heads, m.num_kv_heads, m.resolved_head_dim, m.ffn_dim,
                   m.rope_theta, m.norm_eps, m.attention, m.init_std,
                   scaled_out_std(m.init_std, m.num_layers), jnp.dtype(m.dtype),
                   jnp.dtype(m.param_dtype))


class Block(nnx.Module):
    def __init__(self, c: BlockConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.param_dtype)
        self.attn = Attention(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
                              rope_theta=c.rope_theta, impl=c.attention, std=c.std,
                              out_std=c.out_std, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.param_dtype)
        self.mlp = MLP(c.d_model, c.ffn_dim, std=c.std, out_std=c.out_std, dtype=c.dtype,
                       param_dtype=c.param_dtype, rngs=rngs)

    def __call__(self, h_BxSxD, positions_BxS, segment_ids_BxS):
        h_BxSxD = h_BxSxD + self.attn(self.attn_norm(h_BxSxD), positions_BxS, segment_ids_BxS)
        h_BxSxD = constrain(h_BxSxD, ACT)
        h_BxSxD = h_BxSxD + self.mlp(self.mlp_norm(h_BxSxD))
        return constrain(h_BxSxD, ACT)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        block_cfg = BlockConfig.from_model(cfg)
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return Block(block_cfg, rngs)
            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(block_cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              cfg.init_std, pdt)
        self.dtype = dt

    def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        """Logits [B, S, V] in the compute dtype (the loss upcasts)."""
        B, S = tokens_BxS.shape
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        # Gather the table's embed dim before the lookup (FSDP's all-gather): a lookup into a
        # table sharded on embed would force the batch-sharded gradient to be resharded.
        table_VxD = constrain(self.embed[...], ("vocab", None))
        h_BxSxD = constrain(jnp.take(table_VxD, tokens_BxS, axis=0).astype(self.dtype), ACT)
        h_BxSxD = self._run_layers(h_BxSxD, positions_BxS, segment_ids_BxS)
        h_BxSxD = self.final_norm(h_BxSxD)
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_BxSxV = jnp.einsum("bsd,dv->bsv", h_BxSxD, w_DxV.astype(self.dtype))
        return constrain(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))

    def _run_layers(self, h_BxSxD, positions_BxS, segment_ids_BxS):
        def apply(block, h):
            return block(h, positions_BxS, segment_ids_BxS)

        if self.cfg.remat != "none":
            # Inside a rolled scan loop XLA cannot CSE the recomputation away, so the barrier is
            # not needed; unrolled (a Python loop, or scan_unroll > 1) it is, or remat is a no-op.
            rolled = self.cfg.scan_layers and self.cfg.scan_unroll == 1
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not rolled)
        if not self.cfg.scan_layers:
            for block in self.layers:
                h_BxSxD = apply(block, h_BxSxD)
            return h_BxSxD
        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return apply(nnx.merge(graphdef, layer_state), h), None

        h_BxSxD, _ = jax.lax.scan(body, h_BxSxD, stacked, unroll=self.cfg.scan_unroll)
        return h_BxSxD
