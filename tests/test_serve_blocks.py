"""Paged KV cache bookkeeping: allocation, sharing, copy-on-write, the prefix cache, no leaks."""
import random

import numpy as np
import pytest

from jaxlm.serve.blocks import (NULL_BLOCK, BlockPool, OutOfBlocks, SequenceBlocks,
                                num_blocks_for)

BS = 4


def _state(pool, *seqs):
    """Everything observable about a pool and some sequences, to compare before and after."""
    refs = tuple(pool.refcount(b) for b in range(1, pool.num_blocks))
    seq_state = tuple((list(s.blocks), s.num_tokens, list(s.keys), list(s.pending_copies))
                      for s in seqs)
    return refs, pool.num_free, pool.num_cached, tuple(pool.evictable()), seq_state


class _Device:
    """A fake KV pool holding token ids: sharing and copy-on-write mistakes show as wrong data."""

    def __init__(self, pool):
        self.mem = np.full(pool.num_blocks * pool.block_size, -1)

    def write(self, seq, slots, tokens):
        for src, dst in seq.pending_copies:  # the engine copies before the step writes
            self.mem[dst * BS:(dst + 1) * BS] = self.mem[src * BS:(src + 1) * BS]
        seq.pending_copies.clear()
        assert NULL_BLOCK not in set(np.asarray(slots) // BS)
        self.mem[slots] = tokens

    def read(self, seq):
        return [int(self.mem[seq.slot(i)]) for i in range(seq.num_tokens)]


def _run_random(seed, prefix_caching):
    rng = random.Random(seed)
    pool = BlockPool(16, BS, prefix_caching)
    dev = _Device(pool)
    live, waiting = [], []  # live: [seq, token ids]; waiting: token ids of preempted sequences
    prefixes = [[rng.randrange(4) for _ in range(10)] for _ in range(3)]
    seen = dict(oob=0, cow=0, hits=0, fork=0)

    def grow(seq, tokens, new):
        """Append `new` tokens; on OutOfBlocks check nothing changed and return False."""
        before = _state(pool, seq)
        try:
            slots = seq.append(len(new))
        except OutOfBlocks:
            seen["oob"] += 1
            assert _state(pool, seq) == before
            return False
        seen["cow"] += bool(seq.pending_copies)
        dev.write(seq, slots, new)
        tokens.extend(new)
        seq.commit(tokens)
        return True

    for _ in range(300):
        op = rng.choice(["admit", "admit", "decode", "decode", "decode", "fork", "release",
                         "preempt"])
        if op == "admit" or not live:
            if waiting and rng.random() < 0.5:
                prompt = waiting.pop(0)
            else:
                prompt = (rng.choice(prefixes)[:rng.randint(1, 10)]
                          + [rng.randrange(4) for _ in range(rng.randint(0, 5))])
            seq = SequenceBlocks(pool)
            cached = seq.start(prompt)
            assert cached % BS == 0 and cached <= len(prompt) - 1
            assert prefix_caching or cached == 0
            seen["hits"] += cached // BS
            assert dev.read(seq) == prompt[:cached]  # a hit hands back the right KV
            tokens = list(prompt[:cached])
            if grow(seq, tokens, prompt[cached:]):
                live.append([seq, tokens])
            else:
                seq.release()
                waiting.append(prompt)
        elif op == "decode":
            i = rng.randrange(len(live))
            seq, tokens = live[i]
            if not grow(seq, tokens, [rng.randrange(4) for _ in range(rng.choice([1, 1, 2, 3]))]):
                seq.release()  # the engine preempts the sequence that could not grow
                waiting.append(live.pop(i)[1])
        elif op == "fork":
            seq, tokens = rng.choice(live)
            live.append([seq.fork(), list(tokens)])
            seen["fork"] += 1
        else:
            seq, tokens = live.pop(rng.randrange(len(live)))
            seq.release()
            if rng.random() < 0.3:
                seq.release()  # idempotent
            if op == "preempt":
                waiting.append(tokens)

        pool.check()
        held = [b for seq, _ in live for b in seq.blocks]
        for b in range(1, pool.num_blocks):
            assert pool.refcount(b) == held.count(b)
        assert pool.num_used == len(set(held))
        assert pool.usage() == pytest.approx(len(set(held)) / 15)
        for seq, tokens in live:
            assert seq.num_tokens == len(tokens)
            assert len(seq.blocks) == -(-len(tokens) // BS)
            assert 0 <= seq.waste() < BS
            assert dev.read(seq) == tokens

    for seq, _ in live:
        seq.release()
    pool.check()
    assert pool.num_used == 0 and pool.num_free == 15
    assert all(pool.refcount(b) == 0 for b in range(1, 16))
    assert (pool.num_cached > 0) == prefix_caching
    assert len(pool.evictable()) == pool.num_cached
    return seen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_invariants_and_leak_nothing(seed):
    seen = _run_random(seed, prefix_caching=True)
    # The run must have exercised the interesting paths, or it proves little.
    assert seen["oob"] > 0 and seen["cow"] > 0 and seen["hits"] > 0 and seen["fork"] > 0


def test_random_operations_without_prefix_caching():
    seen = _run_random(3, prefix_caching=False)
    assert seen["hits"] == 0 and seen["oob"] > 0


def test_out_of_blocks_changes_nothing():
    pool = BlockPool(5, BS)  # 4 usable blocks
    a = SequenceBlocks(pool)
    a.append(6)
    a.commit(list(range(6)))  # block 1 of a is full and cached
    b = SequenceBlocks(pool)
    b.append(3)
    before = _state(pool, a, b)
    with pytest.raises(OutOfBlocks):
        a.append(11)  # needs 3 more blocks, 1 available
    assert _state(pool, a, b) == before
    pool.check()

    # A copy-on-write that cannot get its block leaves the shared table alone too.
    c = b.fork()
    pool.allocate(pool.num_free)
    before = _state(pool, a, b, c)
    with pytest.raises(OutOfBlocks):
        c.append(1)
    assert _state(pool, a, b, c) == before

    # A pool short of blocks does not evict cached ones for a request it cannot satisfy.
    pool2 = BlockPool(5, BS)
    s = SequenceBlocks(pool2)
    s.append(8)
    s.commit(list(range(8)))
    s.release()
    assert pool2.num_cached == 2 and pool2.num_free == 4
    with pytest.raises(OutOfBlocks):
        pool2.allocate(5)
    assert pool2.num_cached == 2 and pool2.num_free == 4
    pool2.check()


def test_double_free_raises():
    pool = BlockPool(8, BS)
    (b,) = pool.allocate(1)
    pool.decref(b)
    with pytest.raises(ValueError, match=f"block {b}"):
        pool.decref(b)
    with pytest.raises(ValueError, match="block 5"):
        pool.decref(5)  # never allocated
    for bad in (NULL_BLOCK, 8, -1):
        with pytest.raises(ValueError, match=f"block {bad}"):
            pool.decref(bad)
    with pytest.raises(ValueError, match="free"):
        pool.incref(b)
    pool.check()
    s = SequenceBlocks(pool)
    s.append(5)
    s.release()
    s.release()
    pool.check()
    assert pool.num_free == 7


def _admit(pool, prompt):
    seq = SequenceBlocks(pool)
    cached = seq.start(prompt)
    seq.append(len(prompt) - cached)
    seq.commit(prompt)
    return seq, cached


def test_prefix_cache_sharing_and_lru_eviction():
    pool = BlockPool(16, BS)
    p = list(range(100, 113))  # 3 full blocks and one token
    a, cached_a = _admit(pool, p)
    b, cached_b = _admit(pool, p)
    assert (cached_a, cached_b) == (0, 12)
    assert b.blocks[:3] == a.blocks[:3] and b.blocks[3] != a.blocks[3]
    assert [pool.refcount(x) for x in a.blocks[:3]] == [2, 2, 2]
    assert (pool.hits, pool.queries) == (3, 6)

    # A prompt of exactly 3 blocks matches only 2: its last token must still be computed.
    c = SequenceBlocks(pool)
    assert c.start(p[:12]) == 8
    assert SequenceBlocks(pool).start(p[:1]) == 0
    for s in (a, b, c):
        s.release()
    assert a.blocks == [] and a.num_tokens == 0
    pool.check()
    assert pool.num_used == 0 and pool.num_free == 15

    d, cached_d = _admit(pool, p)
    assert cached_d == 12
    a_blocks = d.blocks[:3]
    assert all(pool.refcount(x) == 1 for x in a_blocks)
    d.release()
    assert set(a_blocks) <= set(pool.evictable())

    # Two cached prompts; P is used again after Q, so Q's blocks are older in the LRU.
    q = list(range(200, 213))
    e, _ = _admit(pool, q)
    q_blocks = e.blocks[:3]
    e.release()
    f, cached_f = _admit(pool, p)
    assert cached_f == 12
    f.release()
    pool.check()

    # Fill the free list; the next block comes from the LRU end: Q's tail, the least recent.
    pool.allocate(pool.num_free - len(pool.evictable()))
    (evicted,) = pool.allocate(1)
    assert evicted == q_blocks[2]
    assert pool.key_of(evicted) is None
    g = SequenceBlocks(pool)
    assert g.start(q) == 8  # Q's third block no longer matches
    h = SequenceBlocks(pool)
    assert h.start(p) == 12  # P's prefix survives
    pool.check()


def test_key_collision_never_hands_out_other_tokens(monkeypatch):
    from jaxlm.serve import blocks
    monkeypatch.setattr(blocks, "block_key", lambda parent, tokens: b"same")
    pool = BlockPool(8, BS)
    a, _ = _admit(pool, [1, 2, 3, 4, 5])
    b, cached = _admit(pool, [9, 9, 9, 9, 5])
    assert cached == 0 and b.blocks[0] != a.blocks[0]
    pool.check()


def test_copy_on_write_after_fork():
    pool = BlockPool(8, BS)
    a = SequenceBlocks(pool)
    a.append(6)  # block 2 of a holds 2 of 4 tokens
    b = a.fork()
    assert b.blocks == a.blocks and all(pool.refcount(x) == 2 for x in a.blocks)
    shared = a.blocks[1]
    slots = b.append(1)
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != shared
    assert a.blocks[1] == shared
    assert b.pending_copies == [(shared, b.blocks[1])]
    assert list(slots) == [b.blocks[1] * BS + 2]
    assert pool.refcount(shared) == 1 and pool.refcount(a.blocks[0]) == 2
    # The original is now the only owner: it writes in place, no copy.
    assert list(a.append(1)) == [shared * BS + 2] and a.pending_copies == []
    pool.check()

    # A fork whose last block is full needs no copy: the next token starts a new block.
    c = SequenceBlocks(pool)
    c.append(4)
    d = c.fork()
    d.append(1)
    assert d.pending_copies == [] and d.blocks[0] == c.blocks[0] and len(d.blocks) == 2
    # A sequence preempted before the engine ran its copy drops it: the target block is freed.
    e = a.fork()
    e.append(1)
    assert e.pending_copies
    e.release()
    assert e.pending_copies == []
    for s in (a, b, c, d):
        s.release()
    pool.check()
    assert pool.num_free == 7 and pool.num_used == 0


def test_prefix_caching_off_registers_and_matches_nothing():
    pool = BlockPool(16, BS, prefix_caching=False)
    p = list(range(13))
    a, _ = _admit(pool, p)
    b, cached = _admit(pool, p)
    assert cached == 0 and set(a.blocks).isdisjoint(b.blocks)
    assert pool.num_cached == 0 and a.keys == [] and pool.hits == 0
    a.release()
    b.release()
    assert pool.evictable() == [] and pool.num_free == 15
    pool.check()


def test_table_slot_and_sizing():
    pool = BlockPool(8, BS)
    s = SequenceBlocks(pool)
    slots = s.append(6)
    assert list(slots) == [s.slot(i) for i in range(6)] and slots.dtype == np.int32
    t = s.table(4)
    assert t.dtype == np.int32 and list(t) == s.blocks + [NULL_BLOCK, NULL_BLOCK]
    assert s.waste() == 2
    with pytest.raises(ValueError, match="width 1"):
        s.table(1)
    with pytest.raises(ValueError, match="token index 6"):
        s.slot(6)

    assert num_blocks_for(1000, 0.5, 4, 10) == 12
    with pytest.raises(ValueError, match="at least 2"):
        num_blocks_for(100, 0.5, 4, 10)
    with pytest.raises(ValueError, match="fraction"):
        num_blocks_for(1000, 1.5, 4, 10)
