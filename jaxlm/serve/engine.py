"""The serving engine: continuous batching over a paged KV cache, with chunked prefill and
prefix caching.

Every step the scheduler fills a token budget: first each running sequence's next tokens in
arrival order (one for a decoding sequence, a chunk of its prompt for one still prefilling),
then new requests from the queue while sequence slots and pages last. A sequence's unknown
tokens are simply `tokens[computed:]`, so a decode is a prefill of one token, and a sequence
preempted when pages run out (the newest running one goes first) is recomputed from its prompt
and output so far when it is readmitted. Prefix caching hands a new sequence the full pages of
an earlier identical prefix (jaxlm/serve/blocks.py), so only the rest is computed.

Requests arrive and leave between steps (`add`, `abort`, `step`), which is what a server needs;
`generate` runs a list of requests to completion for tests and benchmarks. Outputs follow
jaxlm.generate: the same sampling (same seeds give the same tokens), stop tokens excluded.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np

from jaxlm.config_fields import ConfigError
from jaxlm.generate.engine import Output, Request
from jaxlm.generate.lm import LM
from jaxlm.generate.sampling import RowParams, SamplingConfig
from jaxlm.nn.attend import resolve_impl
from jaxlm.generate.beam import BeamConfig, Beams
from jaxlm.serve.beams import BeamGroup
from jaxlm.serve.blocks import NULL_BLOCK, BlockPool, OutOfBlocks, SequenceBlocks, num_blocks_for
from jaxlm.serve.step import DeviceStep, StepBatch, page_bytes, page_pools

MIN_ROWS = 8     # the smallest step (T); steps are powers of two up to the token budget
COUNTERS = ("steps", "computed_tokens", "generated_tokens", "finished", "aborted", "preempted",
            "forked", "copied_pages", "beam_rounds")
IDLE = SamplingConfig(temperature=0.0)  # an empty slot's settings (keeps all-greedy steps cheap)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    page_size: int = 16
    pages: int = 0                   # 0: as many as `memory_fraction` of free memory holds
    memory_fraction: float = 0.85
    max_seqs: int = 64               # sequences in flight (slots of a step)
    token_budget: int = 512          # tokens one step computes at most
    chunked_prefill: bool = True     # off: a prompt is prefilled in one step (budget >= context)
    prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's context
    max_queue: int = 1024            # waiting requests beyond this are refused (QueueFull)
    attention_impl: str = "auto"     # pallas (the paged kernel) or xla (its jnp reference)

    def validate(self):
        for name, lo in (("page_size", 1), ("pages", 0), ("max_seqs", 1), ("token_budget", 1),
                         ("max_queue", 1)):
            if getattr(self, name) < lo:
                raise ConfigError(f"serve.{name}={getattr(self, name)}: expected >= {lo}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"serve.memory_fraction={self.memory_fraction}: expected (0, 1]")
        if self.attention_impl not in ("auto", "pallas", "xla"):
            raise ConfigError(f"serve.attention_impl={self.attention_impl!r}: expected auto, "
                              f"pallas or xla")
        return self


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests (a server answers 429)."""


@dataclasses.dataclass
class Sequence:
    id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    stop_ids: frozenset
    max_tokens: int
    arrived: float
    output_ids: list[int] = dataclasses.field(default_factory=list)
    blocks: SequenceBlocks | None = None
    computed: int = 0                 # tokens whose K/V are in the cache
    slot: int = -1
    fresh: bool = False               # took its slot this step
    index: int = 0                    # which of its request's n choices
    fanout: int = 1                   # choices still to fork off it (before its last token)
    reserved: list[int] = dataclasses.field(default_factory=list)  # its choices' slots
    group: BeamGroup | None = None    # beam search: the request's beams

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def penalised(self) -> bool:
        """Penalties read every prompt token from the device's seen table, which only tokens
        that pass through a step mark: such a sequence takes no cached prefix."""
        return _penalised(self.sampling)

    @property
    def slots_needed(self) -> int:
        """Slots to take at admission: its own and its choices' or (the first) beams'."""
        if self.group is not None and len(self.group.members) == 1:
            return self.group.width
        return self.fanout

    @property
    def unknown(self) -> int:
        """Tokens to compute before it can sample (or, with choices to fork, before it forks:
        each choice computes the last prompt token itself)."""
        return len(self.tokens) - self.computed - (self.fanout > 1)


def _penalised(s: SamplingConfig) -> bool:
    return s.repetition_penalty != 1.0 or s.presence_penalty != 0.0


def _seeded(s: SamplingConfig, i: int) -> SamplingConfig:
    """Choice i's settings: the request's seed + i."""
    return dataclasses.replace(s, seed=(s.seed + i) % 2**31)


@dataclasses.dataclass
class Delta:
    """What one step produced for one request."""
    request_id: str
    token_ids: list[int]              # new tokens (a stop token is not included)
    finish_reason: str | None = None  # "stop", "length", or None while it runs
    index: int = 0                    # the choice (of the request's n)


class ServingEngine:
    def __init__(self, lm: LM, cfg: ServeConfig = ServeConfig(), eos_id: int | None = None):
        self.cfg, self.lm, self.eos_id = cfg.validate(), lm, eos_id
        max_len = cfg.max_model_len or lm.context_len
        if max_len is None:
            raise ConfigError("serve.max_model_len: the model has no context limit of its own; "
                              "give the longest sequence to serve")
        if lm.context_len is not None and max_len > lm.context_len:
            raise ConfigError(f"serve.max_model_len={max_len}: the model reads at most "
                              f"{lm.context_len} tokens")
        if not cfg.chunked_prefill and cfg.token_budget < max_len:
            raise ConfigError(f"serve.token_budget={cfg.token_budget} with chunked_prefill off "
                              f"must hold a whole prompt: expected >= max_model_len={max_len}")
        self.max_len = max_len
        self.table_width = -(-max_len // cfg.page_size)
        impl = cfg.attention_impl
        if impl == "auto":  # the kernel where flash attention would run (Hopper), else jnp
            impl = "pallas" if resolve_impl("auto", lm.cfg.dtype) == "pallas" else "xla"
        pages = cfg.pages or self._pages_from_memory(impl)
        self.pool = BlockPool(pages, cfg.page_size, prefix_caching=cfg.prefix_caching)
        self.device = DeviceStep(lm, pages, cfg.page_size, cfg.max_seqs, impl)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, list[Sequence]] = {}  # a request's sequences (n choices)
        self.free_slots = list(range(cfg.max_seqs - 1, -1, -1))
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))

    def _pages_from_memory(self, impl: str) -> int:
        """As many pages as `memory_fraction` of the device's free memory holds; on a device
        that reports no memory (a CPU), room for every slot's longest sequence."""
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return self.cfg.max_seqs * self.table_width + 1
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        one = page_bytes(jax.eval_shape(lambda: page_pools(self.lm, 1, self.cfg.page_size, impl)))
        return num_blocks_for(free, self.cfg.memory_fraction, self.cfg.page_size,
                              one // self.cfg.page_size)

    # ---------------------------------------------------------------- requests

    def add(self, request_id: str, prompt_ids, sampling: SamplingConfig = SamplingConfig(),
            n: int = 1, beams: BeamConfig | None = None):
        """Queue a request for `n` choices (choice i samples with seed + i); bad input raises
        ConfigError (naming what is wrong), a full queue QueueFull.

        The n choices share the prompt's pages: one sequence computes all of the prompt but its
        last token, then forks (every page shared, copy-on-write for the partly filled last
        one), and each choice computes the last token itself and samples from there. A
        penalised request is n independent sequences instead: penalties read the prompt from
        a device table that only the tokens a sequence computes itself fill.

        `beams`: beam search instead of sampling (jaxlm.serve.beams), one result (index 0) when
        the search ends, EOS the only stop token."""
        prompt = [int(t) for t in prompt_ids]
        if request_id in self.by_id:
            raise ConfigError(f"request id {request_id!r} is already in flight")
        if not prompt:
            raise ConfigError("the prompt is empty: it needs at least one token")
        if len(prompt) >= self.max_len:
            raise ConfigError(f"the prompt has {len(prompt)} tokens, but this server reads at "
                              f"most {self.max_len} (prompt and output): shorten it")
        vocab = self.lm.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ConfigError(f"prompt token ids must be in [0, {vocab})")
        sampling.validate()
        if not 1 <= n <= self.cfg.max_seqs:
            raise ConfigError(f"n={n}: expected 1 to {self.cfg.max_seqs} choices (serve.max_seqs)")
        longest = min(len(prompt) + sampling.max_tokens, self.max_len)
        if -(-longest // self.cfg.page_size) > self.pool.num_blocks - 1:
            raise ConfigError(f"the request may reach {longest} tokens, more than all "
                              f"{self.pool.num_blocks - 1} KV pages of {self.cfg.page_size} hold: "
                              f"lower max_tokens or shorten the prompt")
        if len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue)")
        stops = frozenset(sampling.stop_ids) | (
            frozenset() if self.eos_id is None else {self.eos_id})
        limit, now = min(sampling.max_tokens, self.max_len - len(prompt)), time.monotonic()
        if beams is not None:
            if not 1 <= beams.validate().width <= self.cfg.max_seqs:
                raise ConfigError(f"beams={beams.width}: expected 1 to {self.cfg.max_seqs} "
                                  f"(serve.max_seqs)")
            seq = Sequence(request_id, prompt, sampling, frozenset(), limit, now)
            seq.group = BeamGroup(Beams(beams, limit, self.eos_id), [seq])
            seqs = seq.group.members
        elif n > 1 and _penalised(sampling):
            seqs = [Sequence(request_id, prompt, _seeded(sampling, i), stops, limit, now, index=i)
                    for i in range(n)]
        else:
            seqs = [Sequence(request_id, prompt, sampling, stops, limit, now, fanout=n)]
        self.waiting.extend(seqs)
        self.by_id[request_id] = seqs

    def abort(self, request_id: str) -> bool:
        """Drop a request now (a client went away): its pages are freed at once."""
        seqs = self.by_id.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if seq in self.running:
                self._leave(seq)
            else:
                self.waiting.remove(seq)
                if seq.blocks is not None:
                    seq.blocks.release()
        self.counters["aborted"] += 1
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- scheduling

    def _leave(self, seq: Sequence):
        """Take a running sequence out: pages released, slot freed."""
        self.running.remove(seq)
        seq.blocks.release()
        seq.blocks = None
        self.free_slots += [seq.slot] + seq.reserved
        seq.slot, seq.reserved = -1, []

    def _preempt(self, seq: Sequence):
        """Out of pages: the sequence goes back to the front of the queue, to be recomputed
        (its full pages stay cached for its return)."""
        self._leave(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.counters["preempted"] += 1

    def _take(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's unknown tokens fit this step (0: none)."""
        want = seq.unknown
        n = min(want, budget) if self.cfg.chunked_prefill else want
        return n if n <= budget else 0

    def _fork(self, seq: Sequence):
        """The choices of a request whose prompt (all but its last token) is computed: each a
        sequence sharing every page, with seed + i and a slot of its own."""
        for i in range(1, seq.fanout):
            child = Sequence(seq.id, seq.prompt_ids, _seeded(seq.sampling, i), seq.stop_ids,
                             seq.max_tokens, seq.arrived, index=i,
                             blocks=seq.blocks.fork(), computed=seq.computed)
            child.slot, child.fresh = seq.reserved.pop(), True
            self.running.append(child)
            self.by_id[seq.id].append(child)
        seq.fanout = 1
        self.counters["forked"] += 1

    def _schedule(self) -> list[tuple[Sequence, int, np.ndarray]]:
        budget, scheduled = self.cfg.token_budget, []
        for seq in list(self.running):  # choices fork once the shared prompt is in the cache
            if seq.fanout > 1 and not seq.unknown:
                self._fork(seq)
        queue = list(self.running)  # arrival order; the newest is preempted first
        while queue and budget:
            seq = queue.pop(0)
            n = self._take(seq, budget)
            if not n:
                continue
            while True:
                try:
                    slots = seq.blocks.append(n)
                    break
                except OutOfBlocks:
                    victim = queue.pop() if queue else seq
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq.slot < 0:  # it preempted itself
                continue
            scheduled.append((seq, n, slots))
            budget -= n
        while self.waiting and budget and len(self.free_slots) >= self.waiting[0].slots_needed:
            seq = self.waiting[0]
            if seq.blocks is None:
                seq.blocks = SequenceBlocks(self.pool)
                seq.computed = 0 if seq.penalised else seq.blocks.start(seq.tokens)
            n = self._take(seq, budget)
            try:  # a parent with nothing left before its fork is admitted to fork
                slots = seq.blocks.append(n) if n or not seq.unknown else None
            except OutOfBlocks:
                slots = None
            if slots is None:  # `add` made sure a sequence alone always fits
                seq.blocks.release()
                seq.blocks, seq.computed = None, 0
                break
            self.waiting.popleft()
            seq.slot, seq.fresh = self.free_slots.pop(), True
            seq.reserved = [self.free_slots.pop() for _ in range(seq.slots_needed - 1)]
            self.running.append(seq)
            if n:
                scheduled.append((seq, n, slots))
            budget -= n
        return scheduled

    def _batch(self, scheduled, rows: int | None = None, max_q_len: int | None = None
               ) -> StepBatch:
        """The step's host arrays; `rows` and `max_q_len` force a shape (warmup: nothing
        scheduled, every row padding)."""
        cfg, S, M = self.cfg, self.cfg.max_seqs, self.table_width
        total = sum(n for _, n, _ in scheduled)
        T = rows or max(MIN_ROWS, 1 << (total - 1).bit_length())
        tokens, positions, real, slots_T, owner = (np.zeros(T, np.int32) for _ in range(5))
        owner[:] = S
        slots_T[:] = NULL_BLOCK * cfg.page_size
        tables = np.full((S, M), NULL_BLOCK, np.int32)
        kv_lens, q_lens, last_row, index = (np.zeros(S, np.int32) for _ in range(4))
        sampling, fresh = np.zeros(S, bool), np.zeros(S, bool)
        settings = [IDLE] * S
        row = 0
        for seq, n, slots in sorted(scheduled, key=lambda x: x[0].slot):
            s, start = seq.slot, seq.computed
            tokens[row:row + n] = seq.tokens[start:start + n]
            positions[row:row + n] = np.arange(start, start + n)
            real[row:row + n], slots_T[row:row + n], owner[row:row + n] = 1, slots, s
            tables[s] = seq.blocks.table(M)
            kv_lens[s], q_lens[s], last_row[s] = start + n, n, row + n - 1
            sampling[s] = start + n == len(seq.tokens)
            fresh[s], index[s], settings[s] = seq.fresh, len(seq.output_ids), seq.sampling
            seq.fresh = False
            row += n
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        return StepBatch(tokens, positions, real, slots_T, owner, tables, kv_lens, cu, last_row,
                         sampling, fresh, index, RowParams.of(settings),
                         max_q_len=max_q_len or (
                             1 if max(n for _, n, _ in scheduled) == 1 else T))

    def warmup(self):
        """Compile every step shape before serving, so no request waits for a compile: each
        power-of-two row count up to the budget, decode-only (one query per sequence) where
        that many sequences fit, and mixed. The steps are all padding (page 0, nothing read).
        The first shape runs twice: the pools and the seen table enter the first step as
        they were created, every later step as the step returned them (on a mesh, placed
        differently), and only the later form recurs."""
        S = self.cfg.max_seqs
        decode_rows = max(MIN_ROWS, 1 << (S - 1).bit_length())  # a step of S decodes
        shapes, T = [], MIN_ROWS
        while True:
            shapes += [(T, max_q) for max_q in sorted({1, T} if T <= decode_rows else {T})]
            if T >= self.cfg.token_budget:
                break
            T *= 2
        for T, max_q in shapes[:1] + shapes:
            self.device(self._batch([], T, max_q))

    def step(self) -> list[Delta]:
        """One step of every running sequence (and new ones, as room allows): what each
        request gained. Nothing to do: []."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        copies = [c for seq, _, _ in scheduled for c in seq.blocks.pending_copies]
        self.device.copy_pages(copies)
        self.counters["copied_pages"] += len(copies)
        for seq, _, _ in scheduled:
            seq.blocks.pending_copies.clear()
        token_S, logits_SxV = self.device(self._batch(scheduled))
        self.counters["steps"] += 1
        deltas, rounds = [], []
        for seq, n, _ in scheduled:
            seq.computed += n
            self.counters["computed_tokens"] += n
            if seq.unknown or seq.fanout > 1:  # still prefilling: nothing sampled
                seq.blocks.commit(seq.tokens)
                continue
            if seq.group is not None:  # a beam: the group chooses once every beam is here
                seq.blocks.commit(seq.tokens)
                seq.group.logits[id(seq)] = logits_SxV[seq.slot]
                if seq.group.ready() and seq.group not in rounds:
                    rounds.append(seq.group)
                continue
            token = int(token_S[seq.slot])
            if token in seq.stop_ids:
                deltas.append(self._finish(seq, [], "stop"))
                continue
            seq.output_ids.append(token)
            self.counters["generated_tokens"] += 1
            seq.blocks.commit(seq.tokens[:seq.computed])
            if len(seq.output_ids) >= seq.max_tokens:
                deltas.append(self._finish(seq, [token], "length"))
            else:
                deltas.append(Delta(seq.id, [token], index=seq.index))
        return deltas + [d for g in rounds for d in self._beam_round(g)]

    def _beam_round(self, group: BeamGroup) -> list[Delta]:
        """Every beam computed its newest token: the W best continuations, each a fork of its
        parent's pages plus its token; or the search's end (its best hypothesis)."""
        chosen, old = group.choose(), list(group.members)
        if chosen is None:
            for m in old:
                self._leave(m)
            del self.by_id[old[0].id]
            self.counters["finished"] += 1
            best = group.beams.result()
            return [Delta(old[0].id, best.ids, best.finish_reason)]
        rows, _ = chosen
        forks = [old[r].blocks.fork() for r in rows]
        computed = [old[r].computed for r in rows]
        for m in old:
            m.blocks.release()
        parent = old[0]
        while len(group.members) < group.width:  # the first round: the beams take their slots
            m = Sequence(parent.id, parent.prompt_ids, parent.sampling, frozenset(),
                         parent.max_tokens, parent.arrived, index=len(group.members),
                         group=group)
            m.slot, m.fresh = parent.reserved.pop(), True
            self.running.append(m)
            group.members.append(m)
        for m, blocks, done, ids in zip(group.members, forks, computed, group.beams.seqs):
            m.blocks, m.computed, m.output_ids = blocks, done, list(ids)
        self.counters["beam_rounds"] += 1
        return []

    def _finish(self, seq: Sequence, tokens: list[int], reason: str) -> Delta:
        seq.blocks.commit(seq.tokens[:seq.computed])
        self._leave(seq)
        group = self.by_id[seq.id]
        group.remove(seq)
        if not group:
            del self.by_id[seq.id]
        self.counters["finished"] += 1
        return Delta(seq.id, tokens, reason, seq.index)

    # ---------------------------------------------------------------- whole runs, stats

    def generate(self, requests: list[Request]) -> list[Output]:
        """Every request to its end, all queued at once: outputs in request order."""
        ids = [f"r{i}" for i in range(len(requests))]
        for rid, r in zip(ids, requests):
            self.add(rid, r.prompt_ids, r.sampling)
        got = {rid: [] for rid in ids}
        done = {}
        while self.has_work:
            for d in self.step():
                got[d.request_id] += d.token_ids
                if d.finish_reason:
                    done[d.request_id] = d.finish_reason
        return [Output(got[rid], done[rid]) for rid in ids]

    def stats(self) -> dict:
        """Queue, pool and counters, as /metrics reports them."""
        pool, size = self.pool, self.cfg.page_size
        held = sum(len(s.blocks.blocks) for s in self.running)
        waste = sum(s.blocks.waste() for s in self.running)
        return {"waiting": len(self.waiting), "running": len(self.running),
                "pages_total": pool.num_blocks - 1, "pages_used": pool.num_used,
                "pages_cached": pool.num_cached, "pool_usage": pool.usage(),
                "kv_waste": waste / (held * size) if held else 0.0,
                "prefix_hit_rate": pool.hits / pool.queries if pool.queries else 0.0,
                **self.counters}
