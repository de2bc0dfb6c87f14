"""The paged KV cache: serving's cache behind the same `attend(..., cache=)` contract as the dense
KVCache, so the trained model serves requests unchanged.

Keys and values live in one pool of pages per layer ([P, page_size, G, K]); which pages hold a
sequence is host bookkeeping (jaxlm/serve/blocks.py), handed to each step as a block table. A
step's queries are flat: T tokens of many sequences in a [1, T] batch (decodes, prefill chunks,
padding), so one compiled step serves any mix of requests. The step's layout (`PagedStep`) is
the same for every layer; each layer's cache carries its own pages and a reference to it.

Writing: each new token's K/V goes to its slot (page * page_size + offset; padding tokens write
the reserved page 0, which no table lists). Reading: ragged paged attention
(kernels_pallas/paged.py) over each sequence's pages, GQA inside the kernel; `impl=xla` takes its
plain-jnp reference (CPU tests, and any device without the kernel).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxlm.nn.int8 import store
from jaxlm.parallel.sharding import active, logical_to_spec, spans_devices
from kernels_pallas.paged import paged_attention, paged_attention_reference


@struct.dataclass
class PagedStep:
    """Where one step's T flat query tokens go and what they read (shared by every layer)."""
    slots_T: jax.Array           # cache slot each token's K/V is written to
    block_tables_SxM: jax.Array  # pages of each sequence slot (unused entries: page 0)
    kv_lens_S: jax.Array         # tokens of each sequence in the cache after this step's writes
    cu_q_lens_S1: jax.Array      # sequence s's queries are rows [cu[s], cu[s + 1])
    max_q_len: int = struct.field(pytree_node=False, default=1)  # most queries of one sequence
    kv_splits: int = struct.field(pytree_node=False, default=1)  # the kernel's key splits


@struct.dataclass
class PagedKVCache:
    """One layer's pages (values None: the keys' first `v_dim` columns, MLA's shared latent).
    int8 pages carry one float32 scale per stored vector, as the dense KVCache's int8 does
    (jaxlm.nn.int8), and the kernel dequantises them as it reads."""
    k_pages_PxBxGxK: jax.Array
    v_pages_PxBxGxV: jax.Array | None
    step: PagedStep | None = None
    k_scale_PxBxG: jax.Array | None = None   # int8 pages only
    v_scale_PxBxG: jax.Array | None = None
    v_dim: int = struct.field(pytree_node=False, default=0)
    impl: str = struct.field(pytree_node=False, default="xla")

    @classmethod
    def empty(cls, pages: int, page_size: int, kv_heads: int, head_dim: int, dtype,
              v_head_dim: int | None = None, shared_values: bool = False) -> "PagedKVCache":
        k = jnp.zeros((pages, page_size, kv_heads, head_dim), dtype)
        v = None if shared_values else jnp.zeros(
            (pages, page_size, kv_heads, v_head_dim or head_dim), dtype)
        scale = lambda x: (None if x is None or jnp.dtype(dtype) != jnp.int8  # noqa: E731
                           else jnp.zeros(x.shape[:3], jnp.float32))
        return cls(k, v, k_scale_PxBxG=scale(k), v_scale_PxBxG=scale(v),
                   v_dim=(v_head_dim or head_dim) if shared_values else 0)

    def arrays(self) -> tuple:
        """Every per-page array (pages and scales; None where absent), in a fixed order."""
        return (self.k_pages_PxBxGxK, self.v_pages_PxBxGxV, self.k_scale_PxBxG,
                self.v_scale_PxBxG)

    def with_arrays(self, fn) -> "PagedKVCache":
        """fn applied to every per-page array that exists (page copies, placement)."""
        k, v, ks, vs = (None if x is None else fn(x) for x in self.arrays())
        return self.replace(k_pages_PxBxGxK=k, v_pages_PxBxGxV=v, k_scale_PxBxG=ks,
                            v_scale_PxBxG=vs)

    def update(self, k_BxTxGxK, v_BxTxGxV, mask):
        """Write the step's new keys and values to their slots; the mask is unchanged (the
        step's layout says what each query sees)."""
        if k_BxTxGxK.shape[0] != 1:
            raise ValueError(f"a paged cache takes one flat row of tokens, got a batch of "
                             f"{k_BxTxGxK.shape[0]}")
        slots_T = self.step.slots_T

        def write(pages, new):
            P, N = pages.shape[:2]
            flat = pages.reshape(P * N, *pages.shape[2:])
            return flat.at[slots_T].set(new.astype(pages.dtype)).reshape(pages.shape)

        k, k_scale = store(write, self.k_pages_PxBxGxK, self.k_scale_PxBxG, k_BxTxGxK[0])
        v, v_scale = store(write, self.v_pages_PxBxGxV, self.v_scale_PxBxG, v_BxTxGxV[0])
        return self.replace(k_pages_PxBxGxK=k, v_pages_PxBxGxV=v, k_scale_PxBxG=k_scale,
                            v_scale_PxBxG=v_scale), mask

    def attend(self, q_BxTxHxK, scale: float, sliding_window: int | None = None):
        """Every query over its own sequence's pages (causal, within the window): [1, T, H, V]."""
        s = self.step
        shared = self.v_pages_PxBxGxV is None
        v_pages = self.k_pages_PxBxGxK if shared else self.v_pages_PxBxGxV
        v_scale = self.k_scale_PxBxG if shared else self.v_scale_PxBxG
        args = (q_BxTxHxK[0], self.k_pages_PxBxGxK, v_pages, s.block_tables_SxM, s.kv_lens_S,
                s.cu_q_lens_S1, self.k_scale_PxBxG, v_scale)
        if self.impl == "pallas":
            out_TxHxV = _kernel_per_shard(args, scale, s.max_q_len, sliding_window,
                                          s.kv_splits)
        else:
            out_TxHxV = paged_attention_reference(*args[:6], sm_scale=scale,
                                                  k_scales_PxBxG=args[6], v_scales_PxBxG=args[7],
                                                  sliding_window=sliding_window)
        out_TxHxV = out_TxHxV.astype(q_BxTxHxK.dtype)
        if self.v_pages_PxBxGxV is None:
            out_TxHxV = out_TxHxV[..., :self.v_dim]
        return out_TxHxV[None]


def _kernel_per_shard(args, scale: float, max_q_len: int, sliding_window: int | None,
                      kv_splits: int = 1):
    """The kernel is one device's program: on a mesh it runs per shard (shard_map), each
    device with its share of the heads and of every page's kv heads, as the rules split them;
    the block tables and lengths are whole everywhere."""
    def call(*a):
        return paged_attention(*a[:6], sm_scale=scale, max_q_len=max_q_len,
                               k_scales_PxBxG=a[6], v_scales_PxBxG=a[7],
                               sliding_window=sliding_window, kv_splits=kv_splits)
    mesh, rules = active()
    if not spans_devices(mesh):
        return call(*args)
    q_spec = logical_to_spec((None, "act_heads", None), rules, mesh)
    pages_spec = logical_to_spec((None, None, "act_kv_heads", None), rules, mesh)
    if q_spec[1] != pages_spec[2]:
        raise ValueError(f"paged attention needs kv heads split like q heads (act_heads -> "
                         f"{q_spec[1]}, act_kv_heads -> {pages_spec[2]}); use fewer tensor "
                         f"shards than kv heads, or attention_impl=xla")
    whole, scales_spec = P(), P(*pages_spec[:3])
    return jax.shard_map(call, mesh=mesh, in_specs=(q_spec, pages_spec, pages_spec, whole,
                                                    whole, whole, scales_spec, scales_spec),
                         out_specs=q_spec, check_vma=False)(*args)
