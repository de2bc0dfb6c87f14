"""Byte-level tokenizer: needs no vocabulary file, so the built-in corpus trains anywhere."""
from __future__ import annotations

import numpy as np

NUM_SPECIAL = 3  # pad, bos, eos come before the 256 byte ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab 259)."""

    name = "byte"
    pad_id = 0
    bos_id = 1
    eos_id = 2
    vocab_size = 256 + NUM_SPECIAL

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int32) of the UTF-8 bytes; no bos/eos is added."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

    def decode(self, ids) -> str:
        """Text of the byte ids; special and out-of-range ids (a larger model vocab) are dropped."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids_N = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)]
        return (ids_N - NUM_SPECIAL).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
