"""The KV cache: the one piece of decoding state, passed explicitly to `attend` (never a mode
flag inside a layer). Attention layers of a stack each get their own (stacked on the layer axis
like the parameters, when the stack is scanned)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm.nn.attend import MaskSpec


@struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far: row b's slots [0, lengths[b]) are written.
    Segment id 0 marks a slot no query may see (never written, or padding)."""
    k_BxTxGxK: jax.Array
    v_BxTxGxK: jax.Array
    segment_ids_BxT: jax.Array
    lengths_B: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype,
              v_head_dim: int | None = None) -> "KVCache":
        k = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        v = jnp.zeros((batch, max_len, kv_heads, v_head_dim or head_dim), dtype)
        return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))

    def update(self, k_BxSxGxK, v_BxSxGxK, mask: MaskSpec) -> tuple["KVCache", MaskSpec]:
        """Append S new tokens to every row (padding among them keeps segment 0, so it takes a
        slot no one reads); returns the cache and the mask of the new queries over all of it."""
        B, S = k_BxSxGxK.shape[:2]
        seg_BxS = (jnp.ones((B, S), jnp.int32) if mask.q_segment_ids is None
                   else mask.q_segment_ids.astype(jnp.int32))

        def write(buf, new, start):  # one row: new [S, ...] into buf [T, ...] at start
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)

        put = jax.vmap(write)
        new = KVCache(put(self.k_BxTxGxK, k_BxSxGxK, self.lengths_B),
                      put(self.v_BxTxGxK, v_BxSxGxK, self.lengths_B),
                      put(self.segment_ids_BxT, seg_BxS, self.lengths_B),
                      self.lengths_B + S)
        over = MaskSpec(causal=mask.causal, sliding_window=mask.sliding_window,
                        q_segment_ids=seg_BxS, kv_segment_ids=new.segment_ids_BxT,
                        q_offset=self.lengths_B)
        return new, over
