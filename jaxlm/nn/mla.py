"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a compressed latent.

Queries: x -> (optional low-rank: down to q_lora_rank, RMSNorm, up) -> heads of
qk_nope_head_dim + qk_rope_head_dim. Keys/values: x -> a kv_lora_rank latent (RMSNorm) plus one
RoPE key of qk_rope_head_dim shared by all heads; the latent goes up to each head's
qk_nope_head_dim key part and v_head_dim value. RoPE touches only the decoupled rope parts. The
logits are scaled by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim); the values' head dim differs
from the keys', which `attend` supports (kernels get both padded to one head dim).

Decoding caches only the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim per token, for
all heads) and absorbs the up-projections into the queries and the output (`_absorbed`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.attend import MaskSpec, attend
from jaxlm.nn.attention import KV_NAMES, Q_NAMES
from jaxlm.nn.kv_cache import KVCache
from jaxlm.nn.norms import RMSNorm
from jaxlm.nn.param import param, project
from jaxlm.nn.rope import RopeScaling, rope
from jaxlm.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    d_model: int
    num_heads: int
    q_lora_rank: int          # 0: queries straight from x
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float
    norm_eps: float
    causal: bool
    impl: str
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    rope_scaling: RopeScaling | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLA(nnx.Module):
    def __init__(self, c: MLAConfig, rngs: nnx.Rngs):
        D, H, R, Kr, pdt = c.d_model, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.param_dtype
        if c.q_lora_rank:
            self.wq_a = param(rngs, (D, c.q_lora_rank), ("embed", "lora"), c.std, pdt)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps, pdt)
            self.wq_b = param(rngs, (c.q_lora_rank, H, c.qk_head_dim), ("lora", "heads", "head_dim"),
                              c.std, pdt)
        else:
            self.wq = param(rngs, (D, H, c.qk_head_dim), ("embed", "heads", "head_dim"), c.std, pdt)
        self.wkv_a = param(rngs, (D, R + Kr), ("embed", "lora"), c.std, pdt)
        self.kv_norm = RMSNorm(R, c.norm_eps, pdt)
        self.wkv_b = param(rngs, (R, H, c.qk_nope_head_dim + c.v_head_dim),
                           ("lora", "heads", "head_dim"), c.std, pdt)
        self.wo = param(rngs, (H, c.v_head_dim, D), ("heads", "head_dim", "embed"), c.out_std, pdt)
        self.c = c

    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, *, bias=None, cache=None):
        c, dt = self.c, self.c.dtype
        Kn, R = c.qk_nope_head_dim, c.kv_lora_rank
        if c.q_lora_rank:
            q_lat_BxSxQ = self.q_norm(project("bsd,dq->bsq", x_BxSxD, self.wq_a, dt, fp8=False))
            q = project("bsq,qhk->bshk", q_lat_BxSxQ, self.wq_b, dt, fp8=False)
        else:
            q = project("bsd,dhk->bshk", x_BxSxD, self.wq, dt, fp8=False)
        kv_a_BxSxL = project("bsd,dl->bsl", x_BxSxD, self.wkv_a, dt, fp8=False)
        latent_BxSxR = self.kv_norm(kv_a_BxSxL[..., :R])
        k_rope_BxSx1xKr = rope(kv_a_BxSxL[..., None, R:], positions_BxS, c.rope_theta,
                               c.rope_scaling)
        q_rope_BxSxHxKr = rope(q[..., Kn:], positions_BxS, c.rope_theta, c.rope_scaling)
        mask = MaskSpec(causal=c.causal, q_segment_ids=segment_ids_BxS, positions=positions_BxS)
        scaling = 1.0 if c.rope_scaling is None else c.rope_scaling.logit_scale  # YaRN's mscale
        scale = c.qk_head_dim ** -0.5 * scaling
        wkv_b_RxHxN = self.wkv_b[...].astype(dt)  # read whole: decoding slices it (_absorbed)
        if cache is not None:
            out_BxSxHxV, cache = self._absorbed(q[..., :Kn], q_rope_BxSxHxKr, latent_BxSxR,
                                                k_rope_BxSx1xKr, wkv_b_RxHxN, mask, bias, cache,
                                                scale)
        else:
            kv_BxSxHxN = jnp.einsum("bsr,rhn->bshn", latent_BxSxR, wkv_b_RxHxN)
            k_nope, v = kv_BxSxHxN[..., :Kn], kv_BxSxHxN[..., Kn:]
            q = jnp.concatenate([q[..., :Kn], q_rope_BxSxHxKr], -1)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxSx1xKr, k_nope.shape[:3] + (
                c.qk_rope_head_dim,))], -1)
            q, k, v = constrain(q, Q_NAMES), constrain(k, KV_NAMES), constrain(v, KV_NAMES)
            out_BxSxHxV, _ = attend(q, k, v, mask, bias=bias, impl=c.impl, scale=scale)
        out_BxSxHxV = constrain(out_BxSxHxV, Q_NAMES)
        return project("bshv,hvd->bsd", out_BxSxHxV, self.wo, dt, fp8=False), cache

    def _absorbed(self, q_nope_BxSxHxKn, q_rope_BxSxHxKr, latent_BxSxR, k_rope_BxSx1xKr,
                  wkv_b_RxHxN, mask, bias, cache, scale):
        """Decoding over the latent cache: W_uk folds into the queries (q_nope . W_uk lands in
        latent space), so keys are [latent, k_rope] and values the latent, one kv head shared
        by all heads; W_uv maps each head's latent output back to v_head_dim. The logits are
        the training path's (q_nope . latent W_uk + q_rope . k_rope), at the same scale."""
        Kn = self.c.qk_nope_head_dim
        q_lat_BxSxHxR = jnp.einsum("bshn,rhn->bshr", q_nope_BxSxHxKn, wkv_b_RxHxN[..., :Kn])
        q = jnp.concatenate([q_lat_BxSxHxR, q_rope_BxSxHxKr], -1)
        k_BxSx1xL = jnp.concatenate([latent_BxSxR[:, :, None], k_rope_BxSx1xKr], -1)
        q, k = constrain(q, Q_NAMES), constrain(k_BxSx1xL, KV_NAMES)
        out_BxSxHxR, cache = attend(q, k, k[..., :self.c.kv_lora_rank], mask, bias=bias,
                                    cache=cache, impl=self.c.impl, scale=scale)
        return jnp.einsum("bshr,rhv->bshv", out_BxSxHxR, wkv_b_RxHxN[..., Kn:]), cache

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """The compressed cache: per token, the normalised latent and the shared RoPE key (one
        kv head of kv_lora_rank + qk_rope_head_dim; the values are its latent columns)."""
        c = self.c
        return KVCache.empty(batch, max_len, 1, c.kv_lora_rank + c.qk_rope_head_dim, c.dtype,
                             c.kv_lora_rank, shared_values=True)
