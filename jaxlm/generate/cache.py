"""Whole-model KV caches as decoding sees them: the tree of per-layer KVCaches a stack takes and
returns (tuples of them: decoding runs the layers as a list), with the operations
decoding needs on all of them at once: logical sharding, dtype, per-row lengths, row reorder."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.nn.kv_cache import KVCache
from jaxlm.nn.paged_cache import PagedKVCache
from jaxlm.parallel.sharding import constrain

# logical names of one layer's cache arrays: rows on the data axes, kv heads on `tensor`
KV_CACHE_NAMES = ("act_batch", None, "act_kv_heads", None)
PAGE_NAMES = (None, None, "act_kv_heads", None)  # a paged pool: pages, slots, kv heads, head dim


def is_cache(x) -> bool:
    return isinstance(x, (KVCache, PagedKVCache))


def map_caches(fn, tree):
    """fn(KVCache) on every layer cache of the tree."""
    return jax.tree.map(fn, tree, is_leaf=is_cache)


def constrain_caches(tree):
    """Every cache laid out by the active rules (a no-op without a mesh)."""
    def one(c: KVCache | PagedKVCache):
        kv = lambda x: None if x is None else constrain(x, KV_CACHE_NAMES)  # noqa: E731
        if isinstance(c, PagedKVCache):  # pages of many rows: only the kv heads are split
            return c.with_arrays(lambda x: constrain(x, PAGE_NAMES[:x.ndim]))
        scale = lambda x: None if x is None else constrain(x, KV_CACHE_NAMES[:3])  # noqa: E731
        return c.replace(k_BxTxGxK=kv(c.k_BxTxGxK), v_BxTxGxV=kv(c.v_BxTxGxV),
                         k_scale_BxTxG=scale(c.k_scale_BxTxG),
                         v_scale_BxTxG=scale(c.v_scale_BxTxG),
                         segment_ids_BxT=constrain(c.segment_ids_BxT, ("act_batch", None)),
                         lengths_B=constrain(c.lengths_B, ("act_batch",)))
    return map_caches(one, tree)


def self_cache_len(tree) -> int:
    """Slots per row of the self-attention caches: the tree's first cache (a block with
    cross-attention holds (self-attention cache, memory cache), in that order)."""
    return jax.tree.leaves(tree, is_leaf=is_cache)[0].k_BxTxGxK.shape[-3]


def cast_caches(tree, dtype):
    """Keys and values stored in `dtype` (KVCache.update casts, or quantises, what it writes)."""
    if dtype is None:
        return tree
    return map_caches(lambda c: c.astype(dtype), tree)


def with_lengths(tree, lengths_B):
    """Every layer's row b holds lengths_B[b] tokens (a memory cache's lengths are set too, and
    never read): slots past it are overwritten by the next
    write and, until then, hidden by causality (they lie after every query). Rolls a cache back
    (speculative decoding) or drops a prefill's padding. lengths_B None: the caches hold no
    lengths (a decode loop's carry, which keeps them once, as the rows' positions)."""
    if lengths_B is None:
        return map_caches(lambda c: c.replace(lengths_B=None), tree)
    return map_caches(lambda c: c.replace(lengths_B=lengths_B.astype(jnp.int32)), tree)


def take_rows(tree, rows_B):
    """Rows reordered (beam search keeps the caches of the beams it continues)."""
    return map_caches(lambda c: jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0), c), tree)


def cache_bytes(tree) -> int:
    """Bytes of keys, values and their int8 scales in the tree (segment ids and lengths are
    bookkeeping, not counted; shapes only: works on abstract caches)."""
    total = []
    map_caches(lambda c: total.extend(x.size * x.dtype.itemsize for x in (
        c.k_BxTxGxK, c.v_BxTxGxV, c.k_scale_BxTxG, c.v_scale_BxTxG) if x is not None), tree)
    return sum(total)
