"""Attention: the projection module and the one dispatch function every model calls.

`attend(q, k, v, ...)` picks the implementation: `xla` (plain jnp, the reference every other
implementation is tested against), `cudnn` (jax.nn.dot_product_attention's fused GPU kernel), or
`auto` (cudnn on GPU for 16-bit inputs, else xla). The Pallas kernel plugs in here later.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.layers import param, rope
from jaxlm.sharding import constrain

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def resolve_impl(impl: str, dtype) -> str:
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


def attend(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, *, segment_ids_BxS=None, causal=True, impl="xla"):
    """Multi-head attention with GQA (H a multiple of G kv heads); returns [B, S, H, K].

    segment_ids: tokens attend only within their own segment (packed documents)."""
    impl = resolve_impl(impl, q_BxSxHxK.dtype)
    if impl == "xla":
        return _attend_xla(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxS, causal)
    if impl == "cudnn":
        mask = None
        if segment_ids_BxS is not None:
            mask = (segment_ids_BxS[:, None, :, None] == segment_ids_BxS[:, None, None, :])
        return jax.nn.dot_product_attention(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask,
                                            is_causal=causal, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")


def _attend_xla(q_BxSxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxS, causal):
    B, S, H, K = q_BxSxHxK.shape
    G = k_BxTxGxK.shape[2]
    q_BxSxGxRxK = q_BxSxHxK.reshape(B, S, G, H // G, K)
    logits_BxGxRxSxT = jnp.einsum("bsgrk,btgk->bgrst", q_BxSxGxRxK, k_BxTxGxK,
                                  preferred_element_type=jnp.float32) * (K ** -0.5)
    T = k_BxTxGxK.shape[1]
    mask_BxSxT = jnp.ones((1, S, T), bool)
    if causal:
        mask_BxSxT = mask_BxSxT & (jnp.arange(S)[:, None] >= jnp.arange(T)[None, :])
    if segment_ids_BxS is not None:
        mask_BxSxT = mask_BxSxT & (segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :])
    logits_BxGxRxSxT = jnp.where(mask_BxSxT[:, None, None], logits_BxGxRxSxT, -1e30)
    probs = jax.nn.softmax(logits_BxGxRxSxT, axis=-1).astype(v_BxTxGxK.dtype)
    out_BxSxGxRxK = jnp.einsum("bgrst,btgk->bsgrk", probs, v_BxTxGxK)
    return out_BxSxGxRxK.reshape(B, S, H, K)


class Attention(nnx.Module):
    """q/k/v projections kept 3-D ([embed, heads, head_dim]) so sharding heads never splits a
    dimension by a reshape; `o` is row-parallel back to embed."""

    def __init__(self, d_model, num_heads, num_kv_heads, head_dim, *, rope_theta, impl, std,
                 out_std, dtype, param_dtype, rngs: nnx.Rngs):
        self.wq = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), std,
                        param_dtype)
        self.wk = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                        std, param_dtype)
        self.wv = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                        std, param_dtype)
        self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                        out_std, param_dtype)
        self.rope_theta, self.impl, self.dtype = rope_theta, impl, dtype

    def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
        dt = self.dtype
        q = jnp.einsum("bsd,dhk->bshk", x_BxSxD, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dgk->bsgk", x_BxSxD, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dgk->bsgk", x_BxSxD, self.wv[...].astype(dt))
        q = constrain(rope(q, positions_BxS, self.rope_theta), ("act_batch", "act_seq", "act_heads", None))
        k = constrain(rope(k, positions_BxS, self.rope_theta), ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
        out_BxSxHxK = attend(q, k, v, segment_ids_BxS=segment_ids_BxS, causal=True, impl=self.impl)
        out_BxSxHxK = constrain(out_BxSxHxK, ("act_batch", "act_seq", "act_heads", None))
        return jnp.einsum("bshk,hkd->bsd", out_BxSxHxK, self.wo[...].astype(dt))
