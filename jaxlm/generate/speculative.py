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
One request at a time; the acceptance rate is reported per request.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def lookup(context: list[int], n: int, K: int) -> list[int]:
    """Prompt-lookup drafts: the K tokens after the latest earlier occurrence of the context's
    last n tokens (shorter n-grams tried down to 1); repeats the last token when none is found."""
    for m in range(min(n, len(context) - 1), 0, -1):
        tail = context[-m:]
        for start in range(len(context) - m - 1, -1, -1):
            if context[start:start + m] == tail:
                got = context[start + m:start + m + K]
                return got + [got[-1]] * (K - len(got))
    return [context[-1]] * K


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
        self.target_engine = Engine(lm, eos_id)
        self.draft_engine = Engine(draft, eos_id) if draft is not None else None
        self._verify = jax.jit(functools.partial(_verify_fn, lm), donate_argnums=(1,))
        if draft is not None:
            self._propose = jax.jit(functools.partial(_propose_fn, draft, K), donate_argnums=(1,))

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
        out = [int(d.tokens_BxN[0, 0])]
        stops = set(np.asarray(d.stop_BxS[0]).tolist())
        max_tokens = int(d.max_B[0])
        if self.draft is not None:
            dd, _ = self.draft_engine.prefill([request], max_len)
            dcache = dd.cache
        cache, seen, params = d.cache, d.seen_BxV, d.params
        pos = n_prompt  # where `last` goes
        drafted = accepted = 0
        while out[-1] not in stops and len(out) < max_tokens and pos + room <= max_len:
            last, count = jnp.int32(out[-1]), jnp.int32(len(out))
            if self.draft is not None:
                drafts, logq, dcache = self._propose(self.draft.state, dcache, last,
                                                     jnp.int32(pos), seen, params, count)
            else:
                drafts = jnp.asarray(lookup(list(request.prompt_ids) + out, self.ngram, K),
                                     jnp.int32)
                logq = jnp.where(jax.nn.one_hot(drafts, seen.shape[-1]) > 0, 0.0, FILTERED)
            n, out_K1, cache, seen = self._verify(lm.state, cache, last, jnp.int32(pos), drafts,
                                                  logq, seen, params, count)
            n = int(n)
            new = np.asarray(out_K1)[:n + 1].tolist()
            drafted, accepted = drafted + K, accepted + n
            pos += n + 1
            for t in new:
                out.append(t)
                if t in stops or len(out) >= max_tokens:
                    break
        if out and out[-1] in stops:
            return SpecResult(out[:-1], "stop", drafted, accepted)
        return SpecResult(out, "length", drafted, accepted)


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
