"""THE block every family is assembled from: attention (grouped-query or latent), an optional
cross-attention, and a feed-forward (dense MLP or Mixture of Experts), each a residual branch
with pre- or post-norm (RMSNorm or LayerNorm). A block returns (h, aux, cache): aux holds
already-weighted loss terms and stats ({} for a dense block), cache the attention's KV cache
(None unless one was passed in). A block with cross-attention caches (self-attention KVCache,
the memory's projected keys/values as a KVCache): the latter is filled from
`LayerInputs.memory_BxTxD` on the call that passes it (the prefill) and read on calls without it
(decode steps), so the memory is projected once per request."""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx, struct

from jaxlm.nn.attention import Attention, AttentionConfig
from jaxlm.nn.mla import MLA, MLAConfig
from jaxlm.nn.mlp import MLP, MLPConfig
from jaxlm.nn.moe import MoE, MoEConfig
from jaxlm.nn.norms import make_norm
from jaxlm.parallel.sharding import constrain

RESIDUAL = ("act_batch", "act_res_seq", "act_embed")  # logical names of the residual stream


@struct.dataclass
class LayerInputs:
    """What every block of a stack reads besides the residual stream: per-row arrays, so a
    pipeline splits them into microbatches with the rows."""
    positions_BxS: jax.Array
    segment_ids_BxS: jax.Array | None = None         # packed documents; None: one per row
    memory_BxTxD: jax.Array | None = None            # cross-attention source (encoder output)
    memory_segment_ids_BxT: jax.Array | None = None
    attention_bias: jax.Array | None = None          # [1 or B, H, S, S] self-attention logit bias


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    d_model: int
    attention: AttentionConfig | MLAConfig
    ffn: MLPConfig | MoEConfig
    norm_eps: float
    param_dtype: object
    post_norm: bool = False                         # norm after the residual add (BERT)
    cross_attention: AttentionConfig | None = None  # attends over LayerInputs.memory (T5)
    norm: str = "rms"                               # rms | layer


class Block(nnx.Module):
    def __init__(self, c: BlockConfig, rngs: nnx.Rngs):
        norm = lambda: make_norm(c.norm, c.d_model, c.norm_eps, c.param_dtype)  # noqa: E731
        self.attn_norm = norm()
        self.attn = (MLA if isinstance(c.attention, MLAConfig) else Attention)(c.attention, rngs)
        if c.cross_attention is not None:
            self.cross_norm = norm()
            self.cross_attn = Attention(c.cross_attention, rngs)
        self.mlp_norm = norm()
        if isinstance(c.ffn, MoEConfig):
            self.moe = MoE(c.ffn, rngs)
        else:
            self.mlp = MLP(c.ffn, rngs)
        self.c = c

    def __call__(self, h_BxSxD, inputs: LayerInputs, cache=None):
        cross = self.c.cross_attention is not None
        self_cache, memory_kv = cache if cross and cache is not None else (cache, None)
        h_BxSxD, self_cache = self._residual(self.attn_norm, h_BxSxD, lambda x: self.attn(
            x, inputs.positions_BxS, inputs.segment_ids_BxS, bias=inputs.attention_bias,
            cache=self_cache))
        cache = self_cache
        if cross:
            if cache is not None and inputs.memory_BxTxD is not None:
                memory_kv = self.cross_attn.memory_cache(inputs.memory_BxTxD,
                                                         inputs.memory_segment_ids_BxT)
            h_BxSxD, _ = self._residual(self.cross_norm, h_BxSxD, lambda x: self.cross_attn(
                x, None, inputs.segment_ids_BxS, memory_BxTxD=inputs.memory_BxTxD,
                memory_segment_ids_BxT=inputs.memory_segment_ids_BxT, memory_kv=memory_kv))
            cache = None if self_cache is None else (self_cache, memory_kv)
        if isinstance(self.c.ffn, MoEConfig):
            h_BxSxD, aux = self._residual(self.mlp_norm, h_BxSxD, self.moe)
        else:
            h_BxSxD, aux = self._residual(self.mlp_norm, h_BxSxD, lambda x: (self.mlp(x), {}))
        return h_BxSxD, aux, cache

    def empty_cache(self, batch: int, max_len: int):
        """A KV cache for this block's self-attention: `max_len` slots per row (with
        cross-attention: paired with None, the memory's cache the prefill fills)."""
        empty = self.attn.empty_cache(batch, max_len)
        return empty if self.c.cross_attention is None else (empty, None)

    def _residual(self, norm, h_BxSxD, branch):
        """h + branch(norm(h)) (pre-norm) or norm(h + branch(h)) (post-norm); the branch returns
        (y, extra) and extra is passed through."""
        if self.c.post_norm:
            y_BxSxD, extra = branch(h_BxSxD)
            return constrain(norm(h_BxSxD + y_BxSxD), RESIDUAL), extra
        y_BxSxD, extra = branch(norm(h_BxSxD))
        return constrain(h_BxSxD + y_BxSxD, RESIDUAL), extra
