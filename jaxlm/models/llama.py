"""Llama-style decoder: embedding, N x (RMSNorm, attention, RMSNorm, SwiGLU), RMSNorm, head.

The layer stack is either scanned (parameters stacked on a leading 'layers' axis, one compiled
body: fast compiles, and the 'layers' axis is what pipeline parallelism will split) or a plain
list of blocks. `remat` picks what the backward pass recomputes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import pipeline
from jaxlm.config import ModelConfig
from jaxlm.models.attention import Attention
from jaxlm.models import moe
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

        def make_unit(rngs):  # a Block, or with MoE a unit of moe_every layers (models/moe.py)
            if cfg.num_experts:
                return moe.make_unit(lambda r: Block(block_cfg, r), block_cfg, cfg, rngs)
            return Block(block_cfg, rngs)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=moe.num_units(cfg))
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return make_unit(rngs)
            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([make_unit(rngs) for _ in range(moe.num_units(cfg))])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              cfg.init_std, pdt)
        self.dtype = dt

    def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, return_aux=False):
        """Logits [B, S, V] in the compute dtype (the loss upcasts); with `return_aux`, also the
        MoE aux losses/stats summed over MoE layers ({} for a dense model)."""
        h_BxSxD, positions_BxS = self.embed_tokens(tokens_BxS, positions_BxS)
        h_BxSxD, aux = moe.split_aux(self._run_layers(h_BxSxD, positions_BxS, segment_ids_BxS))
        logits_BxSxV = self.logits(h_BxSxD)
        return (logits_BxSxV, aux) if return_aux else logits_BxSxV

    def embed_tokens(self, tokens_BxS, positions_BxS=None):
        """Residual stream [B, S, D] and positions; apart from __call__ because the 1F1B pipeline
        (jaxlm/pipeline.py) runs the layers and the head itself."""
        B, S = tokens_BxS.shape
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        # Gather the table's embed dim before the lookup (FSDP's all-gather): a lookup into a
        # table sharded on embed would force the batch-sharded gradient to be resharded.
        table_VxD = constrain(self.embed[...], ("vocab", None))
        h_BxSxD = constrain(jnp.take(table_VxD, tokens_BxS, axis=0).astype(self.dtype), ACT)
        return h_BxSxD, positions_BxS

    def logits(self, h_BxSxD):
        h_BxSxD = self.final_norm(h_BxSxD)
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_BxSxV = jnp.einsum("bsd,dv->bsv", h_BxSxD, w_DxV.astype(self.dtype))
        return constrain(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))

    def _run_layers(self, h_BxSxD, positions_BxS, segment_ids_BxS):
        if not self.cfg.scan_layers:
            apply = self._remat(lambda block, h, pos, seg: block(h, pos, seg))
            aux = moe.zero_aux(self.cfg)
            for block in self.layers:
                h_BxSxD, a = moe.split_aux(apply(block, h_BxSxD, positions_BxS, segment_ids_BxS))
                aux = moe.add_aux(aux, a)
            return (h_BxSxD, aux) if aux else h_BxSxD
        layer, stacked = self.layer_fn()
        if pipeline.active_plan() is not None:  # mesh.stage > 1: the stack runs as a pipeline
            return pipeline.run_stack(layer, stacked, h_BxSxD, positions_BxS, segment_ids_BxS)

        def body(carry, layer_state):  # MoE units also return aux losses: summed in the carry
            h, a = moe.split_aux(layer(layer_state, carry[0], positions_BxS, segment_ids_BxS))
            return (h, moe.add_aux(carry[1], a)), None

        (h_BxSxD, aux), _ = jax.lax.scan(body, (h_BxSxD, moe.zero_aux(self.cfg)), stacked,
                                         unroll=self.cfg.scan_unroll)
        return (h_BxSxD, aux) if aux else h_BxSxD

    def layer_fn(self):
        """(layer(layer_state, h, positions, segment_ids) -> h, stacked layer state): the scanned
        stack as a pure function, which is what the pipeline schedules need."""
        graphdef, stacked = nnx.split(self.layers)
        apply = self._remat(lambda block, h, pos, seg: block(h, pos, seg))
        return (lambda state, h, pos, seg: apply(nnx.merge(graphdef, state), h, pos, seg)), stacked

    def _remat(self, apply):
        if self.cfg.remat == "none":
            return apply
        # Inside a rolled scan loop XLA cannot CSE the recomputation away, so the barrier is
        # not needed; unrolled (a Python loop, or scan_unroll > 1) it is, or remat is a no-op.
        rolled = self.cfg.scan_layers and self.cfg.scan_unroll == 1
        return nnx.remat(apply, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not rolled)
