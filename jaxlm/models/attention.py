"""Attention: the projection module and the one dispatch function every model calls.

`attend(q, k, v, ...)` picks the implementation: `xla` (plain jnp, the reference every other
implementation is tested against), `cudnn` (jax.nn.dot_product_attention's fused GPU kernel; packed
documents cost it a dense [B, 1, S, S] mask), `pallas` (kernels_pallas flash attention: Mosaic GPU
on Hopper, segment ids handled inside the kernel; interpret mode on CPU, for tests), or `auto`:
pallas on Hopper and cudnn on other GPUs for 16-bit inputs, else xla -- the choice the H100
measurements in benchmarks/RESULTS.md support (no TPU has been measured, so TPU gets xla).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.models.layers import param, rope
from jaxlm.sharding import constrain, logical_to_spec, sharding_ctx

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


def resolve_impl(impl: str, dtype) -> str:
    if impl != "auto":
        return impl
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return "xla"
    from kernels_pallas.flash import on_hopper
    return "pallas" if on_hopper() else "cudnn"


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
    if impl == "pallas":
        return _attend_pallas(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxS, causal)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")


def _attend_pallas(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxS, causal):
    """The kernel is one device's program: on a mesh it runs per shard (shard_map), with batch and
    heads split the way the activation rules already split them."""
    from kernels_pallas.flash import flash_attention

    def call(q, k, v, *seg):
        return flash_attention(q, k, v, causal=causal, segment_ids=seg[0] if seg else None)

    args = (q_BxSxHxK, k_BxSxGxK, v_BxSxGxK) + (() if segment_ids_BxS is None else
                                                 (segment_ids_BxS,))
    mesh, rules = sharding_ctx()
    if mesh is None or mesh.size == 1:
        return call(*args)
    q_spec = logical_to_spec(("act_batch", "act_seq", "act_heads", None), rules, mesh)
    kv_spec = logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None), rules, mesh)
    if q_spec[1] is not None:
        raise ValueError(f"attention=pallas runs per shard and cannot split the sequence "
                         f"(act_seq -> {q_spec[1]}); use attention=xla or cudnn with "
                         f"sequence parallelism")
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"attention=pallas needs kv heads split like q heads (act_heads -> "
                         f"{q_spec[2]}, act_kv_heads -> {kv_spec[2]}); use fewer tensor shards "
                         f"than kv heads, or attention=xla")
    specs = (q_spec, kv_spec, kv_spec) + ((P(q_spec[0], None),) if len(args) == 4 else ())
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=q_spec,
                         check_vma=False)(*args)


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
