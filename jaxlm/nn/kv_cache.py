"""The KV cache: the one piece of decoding state, passed explicitly to `attend` (never a mode
flag inside a layer). Attention layers of a stack each get their own (stacked on the layer axis
like the parameters, when the stack is scanned).

Two storage choices live here so that layers never branch on them:
- shared values (MLA's latent cache): the values are the keys' first `v_dim` columns, so they
  are stored once (`v_BxTxGxV` is None);
- int8 storage: keys and values rounded to int8 with one float32 scale per (row, token, kv
  head) (symmetric absmax), dequantised when attention reads them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm.nn.attend import MaskSpec
from jaxlm.nn.int8 import store


@struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far: row b's slots [0, lengths[b]) are written.
    Segment id 0 marks a slot no query may see (never written, or padding)."""
    k_BxTxGxK: jax.Array
    v_BxTxGxV: jax.Array | None               # None: the keys' first v_dim columns (shared)
    segment_ids_BxT: jax.Array
    lengths_B: jax.Array
    k_scale_BxTxG: jax.Array | None = None    # int8 storage only
    v_scale_BxTxG: jax.Array | None = None
    v_dim: int = struct.field(pytree_node=False, default=0)  # shared values' head dim
    # programs per kv head when the paged kernel reads this cache (flash-decoding; 1: none;
    # None: jaxlm.nn.attend.auto_kv_splits)
    kv_splits: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype,
              v_head_dim: int | None = None, shared_values: bool = False) -> "KVCache":
        """`shared_values`: the values are the keys' first `v_head_dim` columns (MLA's latent)
        and take no storage of their own."""
        k = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        v = None if shared_values else jnp.zeros(
            (batch, max_len, kv_heads, v_head_dim or head_dim), dtype)
        return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32),
                   v_dim=(v_head_dim or head_dim) if shared_values else 0)

    @property
    def quantized(self) -> bool:
        return self.k_scale_BxTxG is not None

    def astype(self, dtype) -> "KVCache":
        """The same (empty) cache stored in `dtype`; int8 adds the per-head scales."""
        dtype = jnp.dtype(dtype)

        def scale(x):  # one float32 per (row, token, kv head) of an int8 buffer
            return None if x is None or dtype != jnp.int8 else jnp.zeros(x.shape[:-1],
                                                                          jnp.float32)
        return self.replace(k_BxTxGxK=self.k_BxTxGxK.astype(dtype),
                            v_BxTxGxV=_cast(self.v_BxTxGxV, dtype),
                            k_scale_BxTxG=scale(self.k_BxTxGxK),
                            v_scale_BxTxG=scale(self.v_BxTxGxV))

    def keys(self, dtype):
        """All keys, dequantised to `dtype`."""
        return _read(self.k_BxTxGxK, self.k_scale_BxTxG, dtype)

    def values(self, dtype):
        """All values, dequantised to `dtype`."""
        if self.v_BxTxGxV is None:
            return self.keys(dtype)[..., :self.v_dim]
        return _read(self.v_BxTxGxV, self.v_scale_BxTxG, dtype)

    def update(self, k_BxSxGxK, v_BxSxGxV, mask: MaskSpec,
               segments: bool = True) -> tuple["KVCache", MaskSpec]:
        """Append S new tokens to every row (padding among them keeps segment 0, so it takes a
        slot no one reads); returns the cache and the mask of the new queries over all of it.
        With shared values, `v` must be the first v_dim columns of `k` (it is not stored).
        segments=False: the slots' segment ids are left as they are, for a cache that is only
        ever read up to each row's length (the paged kernel's reading), which needs none."""
        B, S = k_BxSxGxK.shape[:2]
        seg_BxS = (jnp.ones((B, S), jnp.int32) if mask.q_segment_ids is None
                   else mask.q_segment_ids.astype(jnp.int32))

        def write(buf, new, start):  # one row: new [S, ...] into buf [T, ...] at start
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)

        put, at = jax.vmap(write), self.lengths_B
        append = lambda buf, new: put(buf, new, at)  # noqa: E731
        k, k_scale = store(append, self.k_BxTxGxK, self.k_scale_BxTxG, k_BxSxGxK)
        v, v_scale = store(append, self.v_BxTxGxV, self.v_scale_BxTxG, v_BxSxGxV)
        new = self.replace(k_BxTxGxK=k, v_BxTxGxV=v, k_scale_BxTxG=k_scale,
                           v_scale_BxTxG=v_scale, lengths_B=at + S,
                           segment_ids_BxT=put(self.segment_ids_BxT, seg_BxS, at)
                           if segments else self.segment_ids_BxT)
        over = MaskSpec(causal=mask.causal, sliding_window=mask.sliding_window,
                        q_segment_ids=seg_BxS, kv_segment_ids=new.segment_ids_BxT,
                        q_offset=self.lengths_B)
        return new, over


def _cast(x, dtype):
    return None if x is None else x.astype(dtype)


def _read(x_BxTxGxK, scale_BxTxG, dtype):
    if scale_BxTxG is None:
        return x_BxTxGxK
    return (x_BxTxGxK.astype(jnp.float32) * scale_BxTxG[..., None]).astype(dtype)
