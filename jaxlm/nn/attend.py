"""The attention contract every family and the inference stack share:

    out, cache = attend(q, k, v, mask, bias=None, cache=None, impl=...)

`mask` (MaskSpec) says which keys each query sees: causal or bidirectional, a sliding window,
per-row segment ids (packed documents; segment 0 marks padding, which no real token sees), and,
for decoding, where each row's queries start among the keys. `bias` is an additive logit bias
[B or 1, H, S, T] (relative positions). `cache` is an explicit KV cache (jaxlm/nn/kv_cache.py):
the new keys/values are appended to it and the queries attend over all of it; nothing else about
decoding reaches a layer. Serving passes a PagedKVCache (jaxlm/nn/paged_cache.py): the queries are
then one flat row of many sequences' tokens, each attending over its own sequence's pages.

Implementations (`impl`): `xla` (plain jnp, the reference every other one is tested against; the
only one that reads a bias with segments or a query offset; a dense cache is read by it, or,
where pallas would run, by the paged kernel over the cache viewed as pages), `cudnn`
(jax.nn.dot_product_attention's fused GPU kernel; segments cost it a dense [B, 1, S, T] mask),
`pallas` (kernels_pallas flash attention: Mosaic GPU on Hopper, segment ids inside the kernel;
interpret mode on CPU), or `auto`: pallas on Hopper and cudnn on other GPUs for 16-bit inputs,
else xla (no TPU has been measured, so TPU gets xla).

Context parallelism: when the active rules split `act_seq` over devices, self-attention with
impl resolving to pallas (and no sliding window) runs the flash kernel per block
(jaxlm/parallel/flash_context.py), K/V reaching each device around a ring or gathered whole as
mesh.context_parallel says. Otherwise `ring` runs jnp blocks masked by the tokens' positions
(jaxlm/parallel/ring.py), and `all_gather` leaves the split to XLA, which gathers K/V whole
onto every device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxlm.models.config import ATTENTION_IMPLS
from jaxlm.parallel.flash_context import flash_context_attention
from jaxlm.parallel.ring import ring_attention
from jaxlm.nn.paged_cache import PagedKVCache, PagedStep
from jaxlm.nn.visibility import MASKED, visible
from jaxlm.parallel.sharding import active, context_split, logical_to_spec, spans_devices
from kernels_pallas.paged import default_backend as paged_backend



@struct.dataclass
class MaskSpec:
    causal: bool = struct.field(pytree_node=False, default=True)
    sliding_window: int | None = struct.field(pytree_node=False, default=None)  # |q - k| < W
    q_segment_ids: jax.Array | None = None   # [B, S] int; None: one segment per row
    kv_segment_ids: jax.Array | None = None  # [B, T]; None: the queries' (self-attention)
    q_offset: jax.Array | None = None        # [B]: key index of each row's first query
    # [B, S] self-attention token positions: ring attention (context parallelism) masks by
    # them, so a row's tokens may be laid out across devices in any order
    positions: jax.Array | None = None

    def allowed(self, S: int, T: int):
        """Boolean [B or 1, S, T]: may query s see key t (by index: key t is at position t,
        query s at s + q_offset)."""
        q_pos = jnp.arange(S)
        if self.q_offset is not None:
            q_pos = q_pos[None] + self.q_offset[:, None]
        kv_seg = self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
        return visible(self.causal, self.sliding_window, q_pos, jnp.arange(T),
                       self.q_segment_ids, kv_seg)


def resolve_impl(impl: str, dtype, kernel_fits: bool = True) -> str:
    """`auto`: pallas on Hopper where the kernel fits the call (self-attention without a logit
    bias), else cudnn on GPUs, for 16-bit inputs; xla otherwise."""
    if impl != "auto":
        return impl
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return "xla"
    from kernels_pallas.flash import on_hopper
    return "pallas" if on_hopper() and kernel_fits else "cudnn"


def attend(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, mask: MaskSpec, *, bias=None, cache=None, impl="xla",
           scale=None):
    """Multi-head attention with GQA (H a multiple of G kv heads); the values' head dim V may
    differ from the queries' and keys' K (MLA). Logits are scaled by `scale` (None:
    1/sqrt(K)). Returns ([B, S, H, V], the updated cache or None)."""
    scale = q_BxSxHxK.shape[-1] ** -0.5 if scale is None else scale
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of "
                         f"{', '.join(ATTENTION_IMPLS)}")
    if isinstance(cache, PagedKVCache):  # serving: flat tokens of many sequences, paged K/V
        cache, _ = cache.update(k_BxTxGxK, v_BxTxGxV, mask)
        return cache.attend(q_BxSxHxK, scale, mask.sliding_window), cache
    if cache is not None:  # decoding: bandwidth-bound
        # the same for every call on this cache (prefill and decode alike); when paged, the
        # segment ids are never read, so not written (a scatter a layer a step less)
        paged = _cache_pages(cache, mask, bias, impl, q_BxSxHxK.dtype)
        cache, mask = cache.update(k_BxTxGxK, v_BxTxGxV, mask, segments=not paged)
        if paged:
            return _attend_cache_paged(q_BxSxHxK, cache, scale), cache
        dt = q_BxSxHxK.dtype
        return _attend_xla(q_BxSxHxK, cache.keys(dt), cache.values(dt), mask, bias,
                           scale), cache
    cross = mask.kv_segment_ids is not None or k_BxTxGxK.shape[1] != q_BxSxHxK.shape[1]
    V = v_BxTxGxV.shape[-1]
    mode, split = context_split()
    self_attention = not cross and bias is None and mask.positions is not None
    if split > 1 and mode == "ring" and not self_attention:
        raise ValueError("ring attention (mesh.context_parallel=ring) runs self-attention "
                         "without a logit bias; use mesh.context_parallel=all_gather")
    kernel_fits = bias is None and not cross
    if split > 1 and self_attention:  # the sequence is split over devices
        mesh, rules = active()
        if resolve_impl(impl, q_BxSxHxK.dtype) == "pallas" and mask.sliding_window is None:
            q, k, v = _kernel_head_dims(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, "pallas")
            return flash_context_attention(q, k, v, mask.q_segment_ids, causal=mask.causal,
                                           scale=scale, mesh=mesh, rules=rules,
                                           gather=mode == "all_gather")[..., :V], None
        if mode == "ring":
            return ring_attention(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, mask.positions,
                                  mask.q_segment_ids, causal=mask.causal,
                                  sliding_window=mask.sliding_window, scale=scale, mesh=mesh,
                                  rules=rules), None
        kernel_fits = False  # all_gather by XLA: the kernel runs per shard
    chosen = resolve_impl(impl, q_BxSxHxK.dtype, kernel_fits=kernel_fits)
    if chosen == "cudnn" and split > 1:  # jax's cuDNN call refuses a split sequence
        if impl != "auto":
            raise ValueError(f"attention_impl=cudnn cannot split the sequence (over {split} "
                             f"devices here): use attention_impl=pallas (Hopper) or xla")
        chosen = "xla"
    impl = chosen
    if impl == "xla":
        return _attend_xla(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, mask, bias, scale), None
    if mask.q_offset is not None:
        raise ValueError(f"attention impl={impl} has no query offset; use xla")
    if impl == "pallas" and (bias is not None or cross):
        raise ValueError("attention impl=pallas takes neither a logit bias nor separate key "
                         "segments (cross-attention); use xla or cudnn")
    q, k, v = _kernel_head_dims(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, impl)
    fn = _attend_cudnn if impl == "cudnn" else _attend_pallas
    return fn(q, k, v, mask, bias, scale)[..., :V], None


CACHE_PAGE = 64  # a dense cache read as pages of this many slots by the paged kernel


def _cache_pages(cache, mask: MaskSpec, bias, impl: str, dtype) -> bool:
    """Whether a dense decode cache is read by the paged-attention kernel: where the flash
    kernel would run (impl resolving to pallas), for causal self-attention with neither window
    nor bias, float keys, one device, a cache length of whole pages and head dims the GPU
    kernel tiles (powers of two >= 16; MLA's 576-wide latent is not). Why: XLA computes
    decode attention in ~8 small kernels a layer (logits, max, exp-sum, a materialised P x V
    product...), the kernel in one."""
    mesh, _ = active()
    return (resolve_impl(impl, dtype, kernel_fits=bias is None) == "pallas" and bias is None
            and mask.causal and mask.sliding_window is None and not cache.quantized
            and not spans_devices(mesh) and cache.k_BxTxGxK.shape[1] % CACHE_PAGE == 0
            and all(d >= 16 and not d & (d - 1) for d in (cache.k_BxTxGxK.shape[-1], cache.v_dim
                                                         or cache.v_BxTxGxV.shape[-1])))


def _attend_cache_paged(q_BxSxHxK, cache, scale):
    """Attention of S new queries per row over a dense cache [B, T, G, K] through the paged
    kernel: the cache viewed (reshaped, no copy) as a PagedKVCache of B * T / CACHE_PAGE pages,
    row b's table its own pages in order, its length the cache's, its S queries one run of the
    flat row. Slots past a row's length are never read, so a prefill's padding (written after
    the real tokens) needs no segment mask."""
    B, S, H, K = q_BxSxHxK.shape
    T, G = cache.k_BxTxGxK.shape[1:3]
    M = T // CACHE_PAGE

    def pages(x):  # [B, T, G, D] -> [B * M, CACHE_PAGE, G, D]
        return None if x is None else x.reshape(B * M, CACHE_PAGE, G, x.shape[-1])
    # split keys where the kernel runs its GPU backend (the TPU kernel takes none), by the batch
    splits = cache.kv_splits or (auto_kv_splits(B * S, G) if paged_backend() == "gpu" else 1)
    # the page table and query offsets are NumPy constants: as jnp.arange each was an iota
    # kernel per layer per decode step (13 us of a 1.16 ms 1B step on an H200)
    layout = PagedStep(None, np.arange(B * M, dtype=np.int32).reshape(B, M),
                       cache.lengths_B.astype(jnp.int32),
                       np.arange(B + 1, dtype=np.int32) * S, max_q_len=S,
                       kv_splits=min(splits, M))
    view = PagedKVCache(pages(cache.k_BxTxGxK), pages(cache.v_BxTxGxV), layout,
                        v_dim=cache.v_dim, impl="pallas")
    return view.attend(q_BxSxHxK.reshape(1, B * S, H, K), scale).reshape(B, S, H, -1)


def auto_kv_splits(rows: int, kv_heads: int, programs: int = 128, most: int = 4) -> int:
    """Key splits for decode attention: enough programs (rows x kv heads x splits) to fill a
    GPU of ~128 SMs once, at most `most`. Measured on an H200 (1B preset, 16 kv heads, ~5
    pages a row): 2 rows 1.04 -> 0.99 ms a step with 4 splits; 16 rows 1.14 -> 1.19 with 4,
    so none there (benchmarks/RESULTS.md)."""
    return max(1, min(most, programs // max(1, rows * kv_heads)))


KERNEL_HEAD_DIMS = (64, 128, 256)  # what kernels_pallas flash attention takes


def _kernel_head_dims(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, impl):
    """The kernels take one head dim for q, k and v (pallas: one of KERNEL_HEAD_DIMS): pad with
    zero columns, which change neither q.k (the scale is passed as it was) nor the output's
    first V columns. xla takes them as they are."""
    if impl == "xla":
        return q_BxSxHxK, k_BxTxGxK, v_BxTxGxV
    D = max(q_BxSxHxK.shape[-1], v_BxTxGxV.shape[-1])
    if impl == "pallas":
        D = next((d for d in KERNEL_HEAD_DIMS if d >= D), D)
    return tuple(_pad_last(x, D) for x in (q_BxSxHxK, k_BxTxGxK, v_BxTxGxV))


def _pad_last(x, n):
    return x if x.shape[-1] == n else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _attend_xla(q_BxSxHxK, k_BxTxGxK, v_BxTxGxV, mask: MaskSpec, bias, scale):
    B, S, H, K = q_BxSxHxK.shape
    G = k_BxTxGxK.shape[2]
    T = k_BxTxGxK.shape[1]
    q_BxSxGxRxK = q_BxSxHxK.reshape(B, S, G, H // G, K)
    logits_BxGxRxSxT = jnp.einsum("bsgrk,btgk->bgrst", q_BxSxGxRxK, k_BxTxGxK,
                                  preferred_element_type=jnp.float32) * scale
    if bias is not None:
        bias_BxGxRxSxT = bias.reshape(bias.shape[0], G, H // G, S, T)
        logits_BxGxRxSxT = logits_BxGxRxSxT + bias_BxGxRxSxT.astype(jnp.float32)
    ok_BxSxT = mask.allowed(S, T)
    logits_BxGxRxSxT = jnp.where(ok_BxSxT[:, None, None], logits_BxGxRxSxT, MASKED)
    probs = jax.nn.softmax(logits_BxGxRxSxT, axis=-1).astype(v_BxTxGxV.dtype)
    out_BxSxGxRxV = jnp.einsum("bgrst,btgv->bsgrv", probs, v_BxTxGxV)
    return out_BxSxGxRxV.reshape(B, S, H, v_BxTxGxV.shape[-1])


def _attend_cudnn(q_BxSxHxK, k_BxTxGxK, v_BxTxGxK, mask: MaskSpec, bias, scale):
    dense = None
    if mask.q_segment_ids is not None:
        kv_seg = mask.q_segment_ids if mask.kv_segment_ids is None else mask.kv_segment_ids
        dense = mask.q_segment_ids[:, None, :, None] == kv_seg[:, None, None, :]
    window = None
    if mask.sliding_window is not None:
        w = mask.sliding_window - 1
        window = (w, 0 if mask.causal else w)
    bias = None if bias is None else bias.astype(q_BxSxHxK.dtype)  # cuDNN wants one dtype
    return jax.nn.dot_product_attention(q_BxSxHxK, k_BxTxGxK, v_BxTxGxK, bias=bias, mask=dense,
                                        scale=scale, is_causal=mask.causal,
                                        local_window_size=window, implementation="cudnn")


def _attend_pallas(q_BxSxHxK, k_BxSxGxK, v_BxSxGxK, mask: MaskSpec, bias, scale):
    """The kernel is one device's program: on a mesh it runs per shard (shard_map), with batch and
    heads split the way the activation rules already split them."""
    from kernels_pallas.flash import flash_attention
    segment_ids_BxS = mask.q_segment_ids

    def call(q, k, v, *seg):
        return flash_attention(q, k, v, causal=mask.causal, segment_ids=seg[0] if seg else None,
                               sliding_window=mask.sliding_window, sm_scale=scale)

    args = (q_BxSxHxK, k_BxSxGxK, v_BxSxGxK) + (() if segment_ids_BxS is None else
                                                 (segment_ids_BxS,))
    mesh, rules = active()
    if not spans_devices(mesh):
        return call(*args)
    q_spec = logical_to_spec(("act_batch", "act_seq", "act_heads", None), rules, mesh)
    kv_spec = logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None), rules, mesh)
    if q_spec[1] is not None:
        raise ValueError(f"attention_impl=pallas runs per shard and cannot split the sequence "
                         f"(act_seq -> {q_spec[1]}); use mesh.context_parallel=ring, or "
                         f"attention_impl=xla or cudnn")
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"attention_impl=pallas needs kv heads split like q heads (act_heads -> "
                         f"{q_spec[2]}, act_kv_heads -> {kv_spec[2]}); use fewer tensor shards "
                         f"than kv heads, or attention_impl=xla")
    specs = (q_spec, kv_spec, kv_spec) + ((P(q_spec[0], None),) if len(args) == 4 else ())
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=q_spec,
                         check_vma=False)(*args)
