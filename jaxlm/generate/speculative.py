"""Speculative decoding: a cheap drafter proposes K tokens, the target scores all of them in one
forward pass over its KV cache, and rejection sampling keeps the output distribution exactly the
target's (Leviathan et al. 2023; Chen et al. 2023): draft token i is accepted with probability
min(1, p_i / q_i); at the first rejection a token is drawn from max(0, p_i - q_i) renormalised,
and if all K are accepted a bonus token comes from the target's next distribution. p and q are
the distributions the sampling settings give (penalties, temperature, top-k/p, min-p): greedy
makes both point masses, and then the output is exactly plain greedy decoding.

Drafters: a smaller jaxlm model with the same tokenizer (its own KV cache, rolled back with the
target's), or prompt lookup (the tokens that followed the latest earlier occurrence of the last
n tokens; a point-mass q). Rolling a cache back is setting its lengths (cache.with_lengths):
slots past a row's length are hidden by causality and overwritten by the next write.
One request at a time, every round inside one compiled `lax.while_loop` (a host round trip a
round cost ~8 ms on an H200, six plain decode steps); the acceptance rate is reported per
request.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.config_fields import ConfigError
from jaxlm.generate import cache as kv
from jaxlm.generate.engine import CACHE_ROUND, Engine, Request, round_up
from jaxlm.generate.lm import LM
from jaxlm.generate.sampling import FILTERED, distribution, row_keys

TAG_DRAFT, TAG_ACCEPT, TAG_RESAMPLE = 3, 1, 2


def accept(logp_target_K1xV, logp_draft_KxV, drafts_K, key):
    """Rejection sampling over K drafts: (number accepted n, the token that follows them: a
    draw from the residual at the first rejection, or from the target's K+1-th distribution)."""
    K = drafts_K.shape[0]
    p_K = jnp.exp(logp_target_K1xV[jnp.arange(K), drafts_K])
    q_K = jnp.exp(logp_draft_KxV[jnp.arange(K), drafts_K])
    u_K = jax.random.uniform(jax.random.fold_in(key, TAG_ACCEPT), (K,))
    ok_K = u_K * q_K < p_K
    n = jnp.sum(jnp.cumprod(ok_K.astype(jnp.int32)))
    p_V = jnp.exp(logp_target_K1xV[n])
    q_V = jnp.where(n < K, jnp.exp(logp_draft_KxV[jnp.minimum(n, K - 1)]), 0.0)
    resid_V = jnp.maximum(p_V - q_V, 0.0)
    resid_V = jnp.where(jnp.sum(resid_V) > 0, resid_V, p_V)  # p == q: nothing to correct
    nxt = jax.random.categorical(jax.random.fold_in(key, TAG_RESAMPLE),
                                 jnp.where(resid_V > 0, jnp.log(resid_V), FILTERED))
    return n, nxt.astype(jnp.int32)


def _emitted(drafts_K, n, nxt):
    """[K + 1]: the n accepted drafts, then nxt, then -1."""
    i = jnp.arange(drafts_K.shape[0] + 1)
    padded = jnp.concatenate([drafts_K, jnp.zeros((1,), jnp.int32)])
    return jnp.where(i < n, padded, jnp.where(i == n, nxt, -1))


def _seen_after(seen_1xV, tokens_N):
    """[N + 1, V]: what is seen before token 0, after token 0, ... (cumulative)."""
    V = seen_1xV.shape[-1]
    onehot = jax.nn.one_hot(tokens_N, V, dtype=jnp.int32)
    cum = jnp.concatenate([jnp.zeros((1, V), jnp.int32), jnp.cumsum(onehot, axis=0)])
    return seen_1xV | (cum > 0)


def _rows(params, n: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), params)


def _verify_fn(lm: LM, state, cache, last, pos, drafts_K, logq_KxV, seen_1xV, params, count):
    """Target forward over [last, drafts], acceptance, and the caches' new length."""
    with lm.rules_scope():
        K = drafts_K.shape[0]
        tokens_1xK1 = jnp.concatenate([last[None], drafts_K])[None]
        logits_1xK1xV, cache = lm.forward(state, tokens_1xK1, (pos + jnp.arange(K + 1))[None],
                                          jnp.ones((1, K + 1), jnp.int32), cache)
        logp_K1xV = distribution(logits_1xK1xV[0], _seen_after(seen_1xV, drafts_K)[:K + 1],
                                 _rows(params, K + 1))
        n, nxt = accept(logp_K1xV, logq_KxV, drafts_K, row_keys(params.seed_B, count[None])[0])
        out_K1 = _emitted(drafts_K, n, nxt)
        seen_1xV = seen_1xV | jnp.any(jax.nn.one_hot(out_K1, seen_1xV.shape[-1], dtype=bool),
                                      axis=0)[None]
        return n, out_K1, kv.with_lengths(cache, (pos + n + 1)[None]), seen_1xV


def _propose_fn(lm: LM, K: int, state, cache, last, pos, seen_1xV, params, count):
    """K draft tokens sampled from the draft model, and their distributions; the draft is fed
    K + 1 tokens (last and every draft), so its cache holds whatever the target accepts; it
    is first cut back to the `pos` tokens before `last` (what the last verify accepted)."""
    with lm.rules_scope():
        cache = kv.with_lengths(cache, pos[None])
        def body(carry, i):
            cache, tok, seen = carry
            logits, cache = lm.forward(state, tok[None, None], (pos + i)[None, None],
                                       jnp.ones((1, 1), jnp.int32), cache)
            logq_1xV = distribution(logits[:, 0], seen, params)
            key = jax.random.fold_in(row_keys(params.seed_B, (count + i)[None])[0], TAG_DRAFT)
            d = jax.random.categorical(key, logq_1xV[0]).astype(jnp.int32)
            seen = seen.at[0, d].set(True)
            return (cache, d, seen), (d, logq_1xV[0])

        (cache, _, _), (drafts_K1, logq_K1xV) = jax.lax.scan(
            body, (cache, last, seen_1xV), jnp.arange(K + 1))
        return drafts_K1[:K], logq_K1xV[:K], cache


def lookup(ctx_L, length, n: int, K: int):
    """Prompt-lookup drafts [K] from the tokens ctx_L[:length] (prompt, then output): the K
    tokens after the latest earlier occurrence of its last n tokens (shorter n-grams tried down
    to 1), the last of them repeated where the context runs out; the last token K times when
    nothing matches."""
    L = ctx_L.shape[0]
    start_L = jnp.arange(L)
    best_m, best_start = jnp.int32(0), jnp.int32(-1)
    for m in range(1, n + 1):  # longer matches win: later iterations overwrite
        match_L = (start_L + m < length) & (m < length)  # an earlier occurrence, wholly before
        for j in range(m):
            tail = ctx_L[jnp.maximum(length - m + j, 0)]
            match_L &= jnp.take(ctx_L, start_L + j, mode="clip") == tail
        latest = jnp.max(jnp.where(match_L, start_L, -1))
        found = latest >= 0
        best_m = jnp.where(found, m, best_m)
        best_start = jnp.where(found, latest, best_start)
    first = best_start + best_m
    idx_K = first + jnp.minimum(jnp.arange(K), length - 1 - first)
    return jnp.where(best_start >= 0, jnp.take(ctx_L, idx_K, mode="clip"),
                     ctx_L[length - 1]).astype(jnp.int32)


@struct.dataclass
class Round:
    """What the speculative loop carries from round to round (caches without lengths when it
    starts: _run_fn sets them)."""
    cache: Any
    draft_cache: Any           # None with prompt lookup
    ctx_L: jax.Array           # the prompt, then the output (slots past `length` unused)
    length: jax.Array          # tokens in ctx_L; the last is fed next, at position length - 1
    seen_1xV: jax.Array
    done: jax.Array
    drafted: jax.Array
    accepted: jax.Array


def _run_fn(lm: LM, draft: LM | None, K: int, ngram: int, state, draft_state, r: Round, params,
            stop_S, prompt_len, max_tokens) -> Round:
    """Speculative rounds until a stop token, the token limit or the end of the cache."""
    max_len = kv.self_cache_len(r.cache)

    def round_(r: Round) -> Round:
        pos = r.length - 1
        last, count = r.ctx_L[pos], r.length - prompt_len
        if draft is not None:
            drafts_K, logq_KxV, draft_cache = _propose_fn(draft, K, draft_state, r.draft_cache,
                                                          last, pos, r.seen_1xV, params, count)
        else:
            drafts_K, draft_cache = lookup(r.ctx_L, r.length, ngram, K), None
            logq_KxV = jnp.where(jax.nn.one_hot(drafts_K, r.seen_1xV.shape[-1]) > 0, 0.0,
                                 FILTERED)
        n, out_K1, cache, seen_1xV = _verify_fn(lm, state, r.cache, last, pos, drafts_K,
                                                logq_KxV, r.seen_1xV, params, count)
        # keep the n + 1 emitted tokens up to the first stop token (kept: the host drops it)
        # and the token limit
        i_K1 = jnp.arange(K + 1)
        stop_K1 = jnp.any(out_K1[:, None] == stop_S[None], axis=-1) & (i_K1 <= n)
        kept = jnp.minimum(jnp.minimum(n + 1, max_tokens - count),
                           jnp.where(jnp.any(stop_K1), jnp.argmax(stop_K1) + 1, K + 1))
        ctx_L = jax.lax.dynamic_update_slice(r.ctx_L, out_K1, (r.length,))
        length = r.length + kept
        done = (jnp.any(stop_K1 & (i_K1 < kept)) | (length - prompt_len >= max_tokens)
                | (length - 1 + K + 1 > max_len))
        return Round(cache, draft_cache, ctx_L, length, seen_1xV, done, r.drafted + K,
                     r.accepted + n)

    # the engines' prefills hand over caches without lengths (a Decoding keeps them as the
    # rows' positions): both hold the prompt, the tokens before position length - 1
    held_1 = (r.length - 1)[None]
    r = r.replace(cache=kv.with_lengths(r.cache, held_1),
                  draft_cache=None if r.draft_cache is None
                  else kv.with_lengths(r.draft_cache, held_1))
    return jax.lax.while_loop(lambda r: ~r.done, round_, r)


@dataclasses.dataclass
class SpecResult:
    ids: list[int]
    finish_reason: str
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


class Speculator:
    """Speculative generation with the target `lm` and a draft model or prompt lookup."""

    def __init__(self, lm: LM, K: int, eos_id: int | None = None, draft: LM | None = None,
                 ngram: int = 0):
        if (draft is None) == (ngram == 0):
            raise ConfigError("speculative decoding needs exactly one drafter: a draft model "
                              "(--draft-run) or prompt lookup (--prompt-lookup N)")
        if lm.seq2seq or (draft is not None and draft.seq2seq):
            raise ConfigError("speculative decoding verifies decoder-only continuations of the "
                              "prompt; an encoder-decoder model decodes with greedy, sampling or "
                              "--beams")
        if draft is not None and draft.cfg.vocab_size != lm.cfg.vocab_size:
            raise ConfigError(f"--draft-run: the draft's vocabulary ({draft.cfg.vocab_size}) "
                              f"differs from the target's ({lm.cfg.vocab_size}); it must share "
                              f"the tokenizer")
        self.lm, self.K, self.draft, self.ngram = lm, K, draft, ngram
        # one row: the rounds below are written for a single sequence's cache
        self.target_engine = Engine(lm, eos_id, min_rows=1)
        self.draft_engine = Engine(draft, eos_id, min_rows=1) if draft is not None else None
        self._run = jax.jit(functools.partial(_run_fn, lm, draft, K, ngram),
                            donate_argnums=(2,))

    def generate(self, request: Request) -> SpecResult:
        lm, K = self.lm, self.K
        n_prompt = len(request.prompt_ids)
        room = K + 1  # a verify pass writes up to K + 1 slots past the output so far
        limit = lm.context_len
        max_len = round_up(n_prompt + request.sampling.max_tokens + room, CACHE_ROUND)
        if limit is not None:
            if self.draft is not None and self.draft.context_len is not None:
                limit = min(limit, self.draft.context_len)
            max_len = min(max_len, limit)
        d, _ = self.target_engine.prefill([request], max_len)
        first = int(d.tokens_BxN[0, 0])
        stops = set(np.asarray(d.stop_BxS[0]).tolist())
        max_tokens = int(d.max_B[0])
        if first in stops or max_tokens <= 1 or n_prompt + room > max_len:
            ids = [] if first in stops else [first]
            return SpecResult(ids, "stop" if first in stops else "length", 0, 0)
        draft_cache = None
        if self.draft is not None:
            draft_cache = self.draft_engine.prefill([request], max_len)[0].cache
        ctx = np.zeros((max_len + K + 1,), np.int32)
        ctx[:n_prompt], ctx[n_prompt] = np.asarray(request.prompt_ids, np.int32), first
        r = Round(d.cache, draft_cache, jnp.asarray(ctx), jnp.int32(n_prompt + 1), d.seen_BxV,
                  jnp.bool_(False), jnp.int32(0), jnp.int32(0))
        r = self._run(lm.state, None if self.draft is None else self.draft.state, r, d.params,
                      d.stop_BxS[0], jnp.int32(n_prompt), jnp.int32(max_tokens))
        ctx, length, drafted, accepted = jax.device_get((r.ctx_L, r.length, r.drafted,
                                                         r.accepted))
        out = ctx[n_prompt:int(length)].tolist()
        if out and out[-1] in stops:
            return SpecResult(out[:-1], "stop", int(drafted), int(accepted))
        return SpecResult(out, "length", int(drafted), int(accepted))


def speculate_run(args, loaded, requests, eos_id):
    """The CLI's speculative mode: (ids, finish reasons, {"acceptance": per request})."""
    draft = None
    if args.draft_run:
        from jaxlm.generate.load import load_run
        d = load_run(args.draft_run, args.draft_step, None, args.cache_dtype)
        if d.tokenizer.fingerprint != loaded.tokenizer.fingerprint:
            raise ConfigError(f"--draft-run {args.draft_run}: its tokenizer "
                              f"({d.tokenizer!r}) differs from the target's")
        draft = d.lm
    spec = Speculator(loaded.lm, args.speculate, eos_id, draft, args.prompt_lookup)
    results = [spec.generate(r) for r in requests]
    return ([r.ids for r in results], [r.finish_reason for r in results],
            {"acceptance": [round(r.acceptance, 4) for r in results]})
