"""Whole-model KV caches as decoding sees them: the tree of per-layer KVCaches a stack takes and
returns (stacked on a leading layer axis where the stack is scanned), with the operations
decoding needs on all of them at once: logical sharding, dtype, per-row lengths, row reorder."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.nn.kv_cache import KVCache
from jaxlm.parallel.sharding import constrain

# logical names of one layer's cache arrays: rows on the data axes, kv heads on `tensor`
KV_CACHE_NAMES = ("act_batch", None, "act_kv_heads", None)


def is_cache(x) -> bool:
    return isinstance(x, KVCache)


def map_caches(fn, tree):
    """fn(KVCache, lead) on every layer cache of the tree; lead = its number of stacked dims."""
    return jax.tree.map(lambda c: fn(c, c.k_BxTxGxK.ndim - 4), tree, is_leaf=is_cache)


def constrain_caches(tree):
    """Every cache laid out by the active rules (a no-op without a mesh)."""
    def one(c: KVCache, lead):
        pre = (None,) * lead
        return KVCache(constrain(c.k_BxTxGxK, pre + KV_CACHE_NAMES),
                       constrain(c.v_BxTxGxK, pre + KV_CACHE_NAMES),
                       constrain(c.segment_ids_BxT, pre + ("act_batch", None)),
                       constrain(c.lengths_B, pre + ("act_batch",)))
    return map_caches(one, tree)


def self_cache_len(tree) -> int:
    """Slots per row of the self-attention caches: the tree's first cache (a block with
    cross-attention holds (self-attention cache, memory cache), in that order)."""
    return jax.tree.leaves(tree, is_leaf=is_cache)[0].k_BxTxGxK.shape[-3]


def cast_caches(tree, dtype):
    """Keys and values stored in `dtype` (KVCache.update casts what it writes to it)."""
    if dtype is None:
        return tree
    return map_caches(lambda c, _: c.replace(k_BxTxGxK=c.k_BxTxGxK.astype(dtype),
                                            v_BxTxGxK=c.v_BxTxGxK.astype(dtype)), tree)


def with_lengths(tree, lengths_B):
    """Every layer's row b holds lengths_B[b] tokens (a memory cache's lengths are set too, and
    never read): slots past it are overwritten by the next
    write and, until then, hidden by causality (they lie after every query). Rolls a cache back
    (speculative decoding) or drops a prefill's padding."""
    return map_caches(lambda c, _: c.replace(lengths_B=jnp.broadcast_to(
        lengths_B.astype(jnp.int32), c.lengths_B.shape)), tree)


def take_rows(tree, rows_B):
    """Rows reordered (beam search keeps the caches of the beams it continues)."""
    return map_caches(lambda c, lead: jax.tree.map(lambda x: jnp.take(x, rows_B, axis=lead), c),
                      tree)


def cache_bytes(tree) -> int:
    """Bytes of keys and values in the tree (shapes only: works on abstract caches)."""
    total = []
    map_caches(lambda c, _: total.append(c.k_BxTxGxK.size * c.k_BxTxGxK.dtype.itemsize
                                         + c.v_BxTxGxK.size * c.v_BxTxGxK.dtype.itemsize), tree)
    return sum(total)
