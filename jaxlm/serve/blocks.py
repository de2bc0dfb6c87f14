"""Host-side bookkeeping of a paged KV cache: which device blocks each sequence's tokens live in.

The device holds, per layer, a pool of `num_blocks` blocks of `block_size` token slots; token i of
a sequence sits at slot `table[i // block_size] * block_size + i % block_size`. Keeping the pool
in fixed-size blocks lets sequences grow one token at a time without reserving their maximum
length up front, and lets sequences share blocks: a fork (parallel sampling) shares all of them
and copies a block only when it would write into a shared one (copy-on-write), and a full block
whose tokens are known can be found again by content (prefix caching), so a request that starts
like an earlier one reuses its KV instead of recomputing it.

Block 0 is never handed out: padding rows and tokens of a step write there, so a real block is
never clobbered by them. Everything here is plain Python and numpy; the engine turns the tables
and slot ids into device arrays.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

NULL_BLOCK = 0


class OutOfBlocks(Exception):
    """An allocation could not be satisfied; nothing was changed (the engine preempts then)."""

    def __init__(self, needed: int, available: int):
        super().__init__(f"need {needed} KV blocks, only {available} available")
        self.needed = needed
        self.available = available


def block_key(parent_key: bytes | None, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: a digest of its parent's key and its token ids.

    Chaining the parent key makes a key stand for the whole prefix up to the block's end, not
    just the block's own tokens. sha256 is stable across processes, unlike `hash`.
    """
    h = hashlib.sha256()
    h.update(parent_key or b"")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockPool:
    """Reference-counted blocks 1..num_blocks-1, with an LRU of unreferenced cached blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block {NULL_BLOCK} is reserved), "
                             f"got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref = [0] * num_blocks
        self._free = collections.deque(range(1, num_blocks))
        # Unreferenced blocks that still hold a registered prefix, oldest use first: they are
        # reused only once the free list is empty, so a later request may still hit them.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # (parent_key, tokens) per cached block, compared on a hit so a digest collision can
        # never hand out the wrong KV.
        self._content: dict[int, tuple[bytes | None, tuple[int, ...]]] = {}
        self._used = 0
        self.hits = 0
        self.queries = 0

    # -- stats ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks with a reference count above 0."""
        return self._used

    @property
    def num_cached(self) -> int:
        """Registered prefix keys."""
        return len(self._block_of)

    def usage(self) -> float:
        """Fraction of usable blocks that are referenced."""
        return self._used / (self.num_blocks - 1)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._ref[block]

    def key_of(self, block: int) -> bytes | None:
        """The prefix key `block` is registered under, or None."""
        return self._key_of.get(block)

    def evictable(self) -> list[int]:
        """Unreferenced cached blocks, least recently used first."""
        return list(self._evictable)

    # -- reference counting --------------------------------------------------------------------

    def _check_id(self, block: int) -> None:
        if not (0 < block < self.num_blocks):
            raise ValueError(f"block {block} is not a usable block id: expected 1.."
                             f"{self.num_blocks - 1} (block {NULL_BLOCK} is reserved)")

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1; raises OutOfBlocks, changing nothing, if too few."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self.num_free:
            raise OutOfBlocks(n, self.num_free)
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._ref[block] = 1
            out.append(block)
        self._used += n
        return out

    def incref(self, block: int) -> None:
        """One more reference to a held or evictable cached block."""
        self._check_id(block)
        if self._ref[block] == 0:
            if block not in self._evictable:
                raise ValueError(f"incref of block {block}: it is free; allocate it instead")
            del self._evictable[block]
            self._used += 1
        self._ref[block] += 1

    def decref(self, block: int) -> None:
        """Drop a reference; at 0 the block is freed, or kept evictable if it holds a prefix."""
        self._check_id(block)
        if self._ref[block] == 0:
            raise ValueError(f"decref of block {block}: its reference count is already 0 "
                             "(double free?)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._used -= 1
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]
        del self._content[block]

    # -- prefix cache --------------------------------------------------------------------------

    def register(self, block: int, parent_key: bytes | None, tokens: Sequence[int]) -> bytes:
        """Record that held, full `block` holds `tokens` after the prefix `parent_key`; its key.

        If another block already holds the key, that one stays cached and `block` is left as is.
        With prefix caching off, only the key is computed (callers can still chain on it).
        """
        tokens = tuple(int(t) for t in tokens)
        if len(tokens) != self.block_size:
            raise ValueError(f"register of block {block}: expected a full block of "
                             f"{self.block_size} tokens, got {len(tokens)}")
        self._check_id(block)
        if self._ref[block] == 0:
            raise ValueError(f"register of block {block}: it is not referenced")
        key = block_key(parent_key, tokens)
        if not self.prefix_caching or key in self._block_of:
            return key
        if block in self._key_of:
            raise ValueError(f"register of block {block}: it already holds a different prefix "
                             "(full blocks are immutable)")
        self._key_of[block] = key
        self._block_of[key] = block
        self._content[block] = (parent_key, tokens)
        return key

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks that hold the longest full-block prefix of token_ids, incref'ed.

        The last token is never matched: the engine must compute at least one token of a prompt
        to get its logits. `queries` counts the blocks that could have matched, `hits` those
        that did.
        """
        if not self.prefix_caching:
            return []
        bs = self.block_size
        n = max(0, (len(token_ids) - 1) // bs)
        self.queries += n
        found, parent = [], None
        for i in range(n):
            tokens = tuple(int(t) for t in token_ids[i * bs:(i + 1) * bs])
            key = block_key(parent, tokens)
            block = self._block_of.get(key)
            if block is None or self._content[block] != (parent, tokens):
                break
            found.append(block)
            parent = key
        for block in found:
            self.incref(block)
        self.hits += len(found)
        return found

    # -- invariants ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise RuntimeError naming the first broken invariant of the pool's state."""
        def fail(msg):
            raise RuntimeError(f"BlockPool invariant broken: {msg}")
        free, lru = list(self._free), list(self._evictable)
        if len(set(free)) != len(free):
            fail(f"free list has duplicates: {sorted(free)}")
        for name, ids in (("free list", free), ("LRU", lru)):
            if any(not (0 < b < self.num_blocks) for b in ids):
                fail(f"{name} holds a reserved or out-of-range id: {sorted(ids)}")
        if self._ref[NULL_BLOCK] != 0 or NULL_BLOCK in self._key_of:
            fail(f"block {NULL_BLOCK} is referenced or cached")
        free_set, lru_set = set(free), set(lru)
        for b in range(1, self.num_blocks):
            if self._ref[b] < 0:
                fail(f"block {b} has refcount {self._ref[b]}")
            states = (b in free_set) + (b in lru_set) + (self._ref[b] > 0)
            if states != 1:
                fail(f"block {b} is in {states} of (free, evictable, referenced), expected 1")
            if b in free_set and b in self._key_of:
                fail(f"free block {b} still holds a prefix key")
            if b in lru_set and b not in self._key_of:
                fail(f"evictable block {b} holds no prefix key")
        if self._used != sum(r > 0 for r in self._ref):
            fail(f"used count {self._used} != {sum(r > 0 for r in self._ref)} referenced blocks")
        if len(self._block_of) != len(self._key_of) or len(self._content) != len(self._key_of):
            fail("key maps disagree in size")
        for key, b in self._block_of.items():
            if self._key_of.get(b) != key:
                fail(f"key {key.hex()[:12]} maps to block {b}, which holds another key")
        if not self.prefix_caching and self._block_of:
            fail("prefix caching is off but keys are registered")


class SequenceBlocks:
    """One sequence's block table: the blocks its tokens live in, in order."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.keys: list[bytes] = []   # of blocks[:len(keys)], the full blocks already committed
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst); the engine copies, clears

    def start(self, token_ids: Sequence[int]) -> int:
        """Reuse cached blocks for a new sequence's prompt; how many tokens are already cached."""
        if self.blocks or self.num_tokens:
            raise ValueError(f"start: expected a new sequence, this one holds {len(self.blocks)} "
                             f"blocks and {self.num_tokens} tokens")
        self.blocks = self.pool.match_prefix(token_ids)
        self.keys = [self.pool.key_of(b) for b in self.blocks]
        self.num_tokens = len(self.blocks) * self.pool.block_size
        return self.num_tokens

    def append(self, n: int) -> np.ndarray:
        """Slot ids (int32) for the next n tokens; on OutOfBlocks nothing changes."""
        if n < 0:
            raise ValueError(f"append: n must be >= 0, got {n}")
        bs = self.pool.block_size
        start, end = self.num_tokens, self.num_tokens + n
        new = -(-end // bs) - len(self.blocks)
        # A partly filled last block shared with a fork must not be written in place: the other
        # sequence's next tokens go to the same slots.
        cow = n > 0 and start % bs != 0 and self.pool.refcount(self.blocks[-1]) > 1
        fresh = self.pool.allocate(new + cow)
        if cow:
            src, dst = self.blocks[-1], fresh.pop(0)
            self.pending_copies.append((src, dst))
            self.pool.decref(src)
            self.blocks[-1] = dst
        self.blocks.extend(fresh)
        self.num_tokens = end
        idx = np.arange(start, end)
        table = np.asarray(self.blocks, dtype=np.int64)
        return (table[idx // bs] * bs + idx % bs).astype(np.int32) if n else np.zeros(0, np.int32)

    def commit(self, token_ids: Sequence[int]) -> None:
        """Register each newly full block, given the sequence's token ids so far.

        Call once the step that wrote the slots has run: a registered block is handed to other
        requests as is. Tokens past num_tokens (a sampled token not yet written) are ignored.
        """
        if not self.pool.prefix_caching:
            return
        bs = self.pool.block_size
        full = min(len(token_ids), self.num_tokens) // bs
        for i in range(len(self.keys), full):
            parent = self.keys[-1] if self.keys else None
            self.keys.append(self.pool.register(self.blocks[i], parent,
                                                token_ids[i * bs:(i + 1) * bs]))

    def fork(self) -> SequenceBlocks:
        """A copy sharing every block (for parallel sampling, beams); writes copy on demand."""
        other = SequenceBlocks(self.pool)
        for b in self.blocks:
            self.pool.incref(b)
        other.blocks = list(self.blocks)
        other.num_tokens = self.num_tokens
        other.keys = list(self.keys)
        return other

    def release(self) -> None:
        """Give back every block (idempotent)."""
        # Last block first, so the prefix's head ends up most recently used in the LRU: evicting
        # a tail block costs one block of cache, evicting a head orphans every block after it.
        for b in reversed(self.blocks):
            self.pool.decref(b)
        self.blocks, self.keys, self.num_tokens = [], [], 0
        self.pending_copies = []  # their targets are freed; copying into them could clobber

    def waste(self) -> int:
        """Slots allocated but not holding a token."""
        return len(self.blocks) * self.pool.block_size - self.num_tokens

    def slot(self, i: int) -> int:
        """The slot of token i."""
        if not (0 <= i < self.num_tokens):
            raise ValueError(f"slot: token index {i} out of range, "
                             f"expected 0..{self.num_tokens - 1}")
        bs = self.pool.block_size
        return self.blocks[i // bs] * bs + i % bs

    def table(self, width: int) -> np.ndarray:
        """The block ids as int32, padded with NULL_BLOCK to `width`."""
        if len(self.blocks) > width:
            raise ValueError(f"table: sequence holds {len(self.blocks)} blocks, more than the "
                             f"width {width}")
        out = np.full(width, NULL_BLOCK, dtype=np.int32)
        out[:len(self.blocks)] = self.blocks
        return out


def num_blocks_for(free_bytes: int, fraction: float, block_size: int, bytes_per_token: int) -> int:
    """How many KV blocks `fraction` of `free_bytes` holds (bytes_per_token: all layers, K+V)."""
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if block_size < 1 or bytes_per_token < 1:
        raise ValueError(f"block_size and bytes_per_token must be >= 1, got {block_size} and "
                         f"{bytes_per_token}")
    per_block = block_size * bytes_per_token
    n = int(free_bytes * fraction) // per_block
    if n < 2:
        raise ValueError(f"{fraction:g} of {free_bytes} free bytes holds {n} KV blocks of "
                         f"{per_block} bytes; need at least 2 (block {NULL_BLOCK} is reserved): "
                         "give the cache more memory or use smaller blocks")
    return n
