"""The serving step on the device: one forward of the trained model over a flat row of T tokens
from many sequences (decodes, prefill chunks and padding mixed), through paged KV caches, then
one sampled token for every sequence whose last computed token was in the row.

Shapes are static per (T, whether any sequence has more than one query): T is a power of two
up to the step's token budget, so a handful of compiles cover every mix. The pages (every
layer's pool) and the penalties' per-slot seen-token table stay on the device and are donated
each step; everything else is small host arrays (`StepBatch`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.config_fields import ConfigError
from jaxlm.generate import cache as kv
from jaxlm.generate.lm import LM
from jaxlm.generate.sampling import RowParams, sample
from jaxlm.nn.kv_cache import KVCache
from jaxlm.nn.paged_cache import PagedKVCache, PagedStep


@struct.dataclass
class StepBatch:
    """One step's host inputs: T token rows, S sequence slots."""
    tokens_T: np.ndarray
    positions_T: np.ndarray
    real_T: np.ndarray          # 1 for a token, 0 for padding (segment ids)
    slots_T: np.ndarray         # cache slot each token's K/V goes to (padding: page 0)
    owner_T: np.ndarray         # sequence slot of each token (padding: S, dropped)
    tables_SxM: np.ndarray
    kv_lens_S: np.ndarray
    cu_q_lens_S1: np.ndarray
    last_row_S: np.ndarray      # row of each slot's last token this step (0 when none)
    sampling_S: np.ndarray      # bool: the slot's row ends its known tokens: sample the next
    fresh_S: np.ndarray         # bool: a new sequence took the slot: forget its seen tokens
    index_S: np.ndarray         # output index of the token sampled (seeds its randomness)
    params: RowParams
    max_q_len: int = struct.field(pytree_node=False, default=1)


def page_pools(lm: LM, pages: int, page_size: int, impl: str):
    """Every attention layer's empty pool of `pages` pages (a tree shaped like the dense
    cache's), in the LM's cache dtype, placed by its rules."""
    if lm.seq2seq:
        raise ConfigError("serving runs decoder-only models; an encoder-decoder (seq2seq) model "
                          "is not served yet")
    dense = jax.eval_shape(lambda s: lm.model(s).stack().empty_cache(1, page_size), lm.state)
    dtype = lm.cache_dtype

    def pool(c: KVCache) -> PagedKVCache:
        _, _, G, K = c.k_BxTxGxK.shape
        shared = c.v_BxTxGxV is None
        V = c.v_dim if shared else c.v_BxTxGxV.shape[-1]
        out = PagedKVCache.empty(pages, page_size, G, K, dtype or c.k_BxTxGxK.dtype,
                                 v_head_dim=V, shared_values=shared)
        return dataclasses.replace(out, impl=impl)

    def build():
        with lm.rules_scope():
            tree = jax.tree.map(pool, dense, is_leaf=lambda x: isinstance(x, KVCache))
            return kv.constrain_caches(tree)
    return jax.jit(build)()


def page_bytes(pools) -> int:
    """Bytes one page takes over every layer (keys, values and int8 pages' scales; shapes
    only: abstract pools work too)."""
    leaves = [x for c in jax.tree.leaves(pools, is_leaf=kv.is_cache)
              for x in c.arrays() if x is not None]
    return sum(math.prod(x.shape[1:]) * jnp.dtype(x.dtype).itemsize for x in leaves)


class DeviceStep:
    """The compiled step and the device state it carries (pools, seen tokens)."""

    def __init__(self, lm: LM, pages: int, page_size: int, max_seqs: int, impl: str):
        self.lm = lm
        self.pools = page_pools(lm, pages, page_size, impl)
        self.seen_SxV = jnp.zeros((max_seqs, lm.cfg.vocab_size), bool)
        self._run = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,))

    def __call__(self, b: StepBatch):
        """Runs one step: (the token sampled for every slot [S] on the host, meaningful where
        `b.sampling_S`; every slot's logits [S, V], left on the device for beam search)."""
        token_S, logits_SxV, self.pools, self.seen_SxV = self._run(self.lm.state, self.pools,
                                                                   self.seen_SxV, b)
        return np.asarray(token_S), logits_SxV

    def copy_pages(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: page src's contents into page dst, every layer."""
        if pairs:
            src, dst = np.asarray(pairs, np.int32).T
            self.pools = self._copy(self.pools, src, dst)

    def _step_fn(self, state, pools, seen_SxV, b: StepBatch):
        lm = self.lm
        with lm.rules_scope():
            layout = PagedStep(b.slots_T, b.tables_SxM, b.kv_lens_S, b.cu_q_lens_S1,
                               max_q_len=b.max_q_len)
            cache = kv.map_caches(lambda c: c.replace(step=layout), pools)
            h_1xTxD, cache = lm.hidden(state, b.tokens_T[None], b.positions_T[None],
                                       b.real_T[None], cache)
            pools = kv.map_caches(lambda c: c.replace(step=None), cache)
            h_1xSxD = h_1xTxD[:, b.last_row_S]
            logits_SxV = lm.logits(state, h_1xSxD)[0]
            S, V = seen_SxV.shape
            seen_SxV = seen_SxV & ~b.fresh_S[:, None]
            seen_SxV = seen_SxV.at[b.owner_T, b.tokens_T].set(True, mode="drop")
            token_S, _ = sample(logits_SxV, seen_SxV, b.index_S, b.params)
            seen_SxV = seen_SxV.at[jnp.arange(S), jnp.where(b.sampling_S, token_S, V)].set(
                True, mode="drop")
            return token_S, logits_SxV, pools, seen_SxV


def _copy_pages(pools, src_N, dst_N):
    return kv.map_caches(lambda c: c.with_arrays(lambda x: x.at[dst_N].set(x[src_N])), pools)
