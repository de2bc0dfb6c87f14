"""The attention layer: q/k/v/o projections around the `attend` contract (jaxlm/nn/attend.py),
used as self-attention (with RoPE where the family has it) or as cross-attention over another
sequence (an encoder's output)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.attend import MaskSpec, attend
from jaxlm.nn.fp8 import amax_state, site
from jaxlm.nn.kv_cache import KVCache
from jaxlm.nn.param import param, project, zeros_param
from jaxlm.nn.rope import RopeScaling, rope
from jaxlm.parallel.sharding import constrain

Q_NAMES = ("act_batch", "act_seq", "act_heads", None)
KV_NAMES = ("act_batch", "act_seq", "act_kv_heads", None)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None   # None: no rotary embedding (learned or relative positions)
    causal: bool
    sliding_window: int | None
    impl: str                  # jaxlm.nn.attend implementations
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    qkv_bias: bool = False     # biases on q/k/v (GPT-2, BERT, Qwen2)
    o_bias: bool = False       # bias on the output projection (GPT-2, BERT)
    scale: float | None = None  # logit scale; None: 1/sqrt(head_dim) (T5 uses 1)
    rope_scaling: RopeScaling | None = None


class Attention(nnx.Module):
    """q/k/v projections kept 3-D ([embed, heads, head_dim]) so sharding heads never splits a
    dimension by a reshape; `o` is row-parallel back to embed."""

    def __init__(self, c: AttentionConfig, rngs: nnx.Rngs):
        D, H, G, K, pdt = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.param_dtype
        self.wq = param(rngs, (D, H, K), ("embed", "heads", "head_dim"), c.std, pdt)
        self.wk = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), c.std, pdt)
        self.wv = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), c.std, pdt)
        self.wo = param(rngs, (H, K, D), ("heads", "head_dim", "embed"), c.out_std, pdt)
        self.fp8_amax = amax_state(4)  # q, k, v, o (delayed fp8 scaling only)
        if c.qkv_bias:
            self.b_q = zeros_param((H, K), ("heads", "head_dim"), pdt)
            self.b_k = zeros_param((G, K), ("kv_heads", "head_dim"), pdt)
            self.b_v = zeros_param((G, K), ("kv_heads", "head_dim"), pdt)
        if c.o_bias:
            self.b_o = zeros_param((D,), ("embed",), pdt)
        self.c = c

    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, *, memory_BxTxD=None,
                 memory_segment_ids_BxT=None, bias=None, cache=None, memory_kv=None):
        """Self-attention over x, or cross-attention over `memory` (keys and values from it,
        no rotary embedding) or over `memory_kv` (a KVCache from `memory_cache`: the memory's
        keys and values already projected, as decoding reuses them every step). Returns
        ([B, S, D], the updated cache or None)."""
        c, dt = self.c, self.c.dtype
        q = project("bsd,dhk->bshk", x_BxSxD, self.wq, dt, amax_2xH=site(self.fp8_amax, 0))
        if c.qkv_bias:
            q = q + self.b_q[...].astype(dt)
        if memory_kv is not None:
            k, v = memory_kv.keys(dt), memory_kv.values(dt)
            memory_segment_ids_BxT = memory_kv.segment_ids_BxT
        else:
            k, v = self._kv(x_BxSxD if memory_BxTxD is None else memory_BxTxD,
                            shares_q_input=memory_BxTxD is None)
        cross = memory_BxTxD is not None or memory_kv is not None
        if c.rope_theta is not None and not cross:
            q = rope(q, positions_BxS, c.rope_theta, c.rope_scaling)
            k = rope(k, positions_BxS, c.rope_theta, c.rope_scaling)
        q, k, v = constrain(q, Q_NAMES), constrain(k, KV_NAMES), constrain(v, KV_NAMES)
        mask = MaskSpec(causal=c.causal, sliding_window=c.sliding_window,
                        q_segment_ids=segment_ids_BxS, kv_segment_ids=memory_segment_ids_BxT,
                        positions=None if cross else positions_BxS)
        out_BxSxHxK, cache = attend(q, k, v, mask, bias=bias, cache=cache, impl=c.impl,
                                    scale=c.scale)
        out_BxSxHxK = constrain(out_BxSxHxK, Q_NAMES)
        y_BxSxD = project("bshk,hkd->bsd", out_BxSxHxK, self.wo, dt,
                          amax_2xH=site(self.fp8_amax, 3))
        return (y_BxSxD + self.b_o[...].astype(dt) if c.o_bias else y_BxSxD), cache

    def _kv(self, kv_BxTxD, shares_q_input: bool = False):
        """Keys and values [B, T, G, K] of a sequence (q's own input when shares_q_input)."""
        c, dt = self.c, self.c.dtype
        q_input = 0 if shares_q_input else None
        k = project("btd,dgk->btgk", kv_BxTxD, self.wk, dt,
                    amax_2xH=site(self.fp8_amax, 1, input_of=q_input))
        v = project("btd,dgk->btgk", kv_BxTxD, self.wv, dt,
                    amax_2xH=site(self.fp8_amax, 2, input_of=q_input))
        if c.qkv_bias:
            k, v = k + self.b_k[...].astype(dt), v + self.b_v[...].astype(dt)
        return k, v

    def memory_cache(self, memory_BxTxD, memory_segment_ids_BxT=None) -> KVCache:
        """The memory's keys and values as a full KVCache (segment 0: padding), computed once
        per request for cross-attention while decoding; `lengths_B` is the memory length and
        is never read (the segment ids mask the padding)."""
        k, v = self._kv(memory_BxTxD)
        B, T = memory_BxTxD.shape[:2]
        seg_BxT = (jnp.ones((B, T), jnp.int32) if memory_segment_ids_BxT is None
                   else memory_segment_ids_BxT.astype(jnp.int32))
        return KVCache(k, v, seg_BxT, jnp.full((B,), T, jnp.int32))

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for this layer as self-attention: `max_len` slots per row."""
        c = self.c
        return KVCache.empty(batch, max_len, c.num_kv_heads, c.head_dim, c.dtype)
