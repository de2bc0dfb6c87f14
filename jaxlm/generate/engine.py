"""The decode engine: bucketed prefill, then one compiled decode step, for a batch of requests
with their own prompt lengths, sampling settings, seeds, stop tokens and token limits.

Prefill pads the prompts to a length bucket (a power of two, so a handful of compiles cover
every prompt), runs them through the model with the padding in segment 0, samples each row's
first token from its last real position, and sets every row's cache length to its prompt length
(the padding slots are overwritten by the decode that follows). The decode step feeds each row's
last token at its own position; it is compiled once per (batch, cache length) and run either
inside a `lax.while_loop` until every row is done (batch generation: no host round trip per
token) or from a host loop (streaming). Both run the same step function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.config_fields import ConfigError, check_positive_int
from jaxlm.generate import cache as kv
from jaxlm.generate.lm import LM
from jaxlm.generate.sampling import RowParams, SamplingConfig, sample

MIN_BUCKET = 16
CACHE_ROUND = 64  # cache lengths are rounded up to a multiple of this (fewer distinct compiles)
NO_STOP = -1


@dataclasses.dataclass
class Request:
    prompt_ids: Any                       # 1-D int sequence
    sampling: SamplingConfig = SamplingConfig()


@dataclasses.dataclass
class Output:
    ids: list[int]                        # generated tokens, the stop token excluded
    finish_reason: str                    # "stop" (a stop token) or "length"


@struct.dataclass
class Decoding:
    """Everything the decode loop carries. The cache holds no lengths (None): every layer's
    is the row's position, pos_B, set from it inside each step. One array, not one per layer:
    the layers' length updates are one add a step, and no two leaves of a Decoding are one
    buffer (the step donates them: with every layer's lengths one forwarded array, XLA was
    free to write a row's count into its position's buffer, as it did on an H200)."""
    cache: Any
    tokens_BxN: jax.Array     # generated tokens so far (row b: [0, count_B[b]))
    last_B: jax.Array         # the token fed next
    pos_B: jax.Array          # its position (= the row's cache length)
    count_B: jax.Array        # tokens generated
    done_B: jax.Array
    max_B: jax.Array          # each row's token limit
    stop_BxS: jax.Array       # each row's stop token ids (NO_STOP: unused slot)
    seen_BxV: jax.Array       # tokens of the prompt and the output (for the penalties)
    logits_BxV: jax.Array     # the last step's raw logits (tests compare them to a full forward)
    params: RowParams


def bucket(n: int, cap: int | None = None) -> int:
    """Padded prompt length: the next power of two (at least MIN_BUCKET), at most `cap`."""
    b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return b if cap is None else min(b, cap)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cache_len(lm: LM, longest: int, want: int) -> int:
    """Cache slots per row for prompts of up to `longest` tokens whose rows need `want` slots:
    rounded up, at least the prompt bucket a decoder-only prefill writes, at most the context."""
    floor = 1 if lm.seq2seq else bucket(longest)
    n = round_up(max(want, floor), CACHE_ROUND)
    return n if lm.context_len is None else min(n, lm.context_len)


def prompt_len(lm: LM, longest: int, max_len: int) -> int:
    """The padded prompt length (a seq2seq prompt feeds the encoder, not the cache)."""
    return bucket(longest, None if lm.seq2seq else max_len)


class Engine:
    def __init__(self, lm: LM, eos_id: int | None = None, min_rows: int | None = None,
                 compiler_options: dict | None = None):
        """min_rows: a batch of fewer requests is padded to this many rows; None: 1 where the
        LM's weights are laid out inputs last (a row multiplies them as a row reduction),
        else 2. Why 2: with one row every product is vector x matrix, and XLA's GPU compiler
        rewrites those under 10M elements (the 1B preset's attention output projection) into
        a multiply and a reduction over the [inputs, outputs] layout instead of a GEMM (its
        DotStrengthReduction pass). On an H200 the 1B preset's batch-1 step went from 1.30 to
        1.15 ms with 2 (benchmarks/RESULTS.md).
        compiler_options: XLA options for the decode step and loop (not prefill), as
        jax.jit takes them."""
        min_rows = (1 if lm.inputs_last else 2) if min_rows is None else min_rows
        check_positive_int("min_rows", min_rows)
        self.lm, self.eos_id, self.min_rows = lm, eos_id, min_rows
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(2,))
        self._step = jax.jit(self._step_fn, donate_argnums=(1,),
                             compiler_options=compiler_options)
        self._loop = jax.jit(self._loop_fn, donate_argnums=(1,),
                             compiler_options=compiler_options)

    # ---------------------------------------------------------------- traced functions

    def _prefill_fn(self, state, host, max_len: int):
        """Prompts [B, P] (padding after each row's length) -> the Decoding after each row's
        first sampled token."""
        lm = self.lm
        with lm.rules_scope():
            tokens_BxP, lens_B = host["tokens"], host["lens"]
            B, P = tokens_BxP.shape
            logits_BxV, cache, lens_B = lm.prefill(state, tokens_BxP, lens_B, max_len)
            V = logits_BxV.shape[-1]
            if lm.seq2seq:  # the penalties see the decoder's tokens (as HF's decoder_input_ids)
                tokens_BxP = jnp.full((B, 1), lm.decoder_start_id, jnp.int32)
            real_BxP = jnp.arange(tokens_BxP.shape[1]) < lens_B[:, None]
            seen_BxV = jnp.zeros((B, V), bool).at[
                jnp.arange(B)[:, None], jnp.where(real_BxP, tokens_BxP, V)].set(True, mode="drop")
            d = Decoding(kv.with_lengths(cache, None), jnp.zeros((B, max_len), jnp.int32),
                         jnp.zeros((B,), jnp.int32), lens_B, jnp.zeros((B,), jnp.int32),
                         jnp.zeros((B,), bool), host["max"], host["stop"], seen_BxV, logits_BxV,
                         host["params"])
            return self._advance(d, logits_BxV)

    def _advance(self, d: Decoding, logits_BxV) -> Decoding:
        """Sample every row's next token from its logits and record it (done rows stay put)."""
        token_B, _ = sample(logits_BxV, d.seen_BxV, d.count_B, d.params)
        B, N = d.tokens_BxN.shape
        rows = jnp.arange(B)
        live_B = ~d.done_B
        tokens_BxN = d.tokens_BxN.at[rows, jnp.where(live_B, d.count_B, N)].set(token_B,
                                                                                 mode="drop")
        seen_BxV = d.seen_BxV.at[rows, jnp.where(live_B, token_B, d.seen_BxV.shape[1])].set(
            True, mode="drop")
        count_B = d.count_B + live_B
        stopped_B = jnp.any(token_B[:, None] == d.stop_BxS, axis=-1)
        done_B = d.done_B | (live_B & stopped_B) | (count_B >= d.max_B)
        return d.replace(tokens_BxN=tokens_BxN, last_B=jnp.where(live_B, token_B, d.last_B),
                         count_B=count_B, done_B=done_B, seen_BxV=seen_BxV,
                         logits_BxV=logits_BxV)

    def _step_fn(self, state, d: Decoding) -> Decoding:
        """One token for every row: feed the last token at its position, sample the next."""
        with self.lm.rules_scope():
            B = d.last_B.shape[0]
            cache = kv.with_lengths(d.cache, d.pos_B)
            logits_Bx1xV, cache = self.lm.forward(state, d.last_B[:, None], d.pos_B[:, None],
                                                  jnp.ones((B, 1), jnp.int32), cache)
            d = d.replace(cache=kv.with_lengths(cache, None), pos_B=d.pos_B + 1)
            return self._advance(d, logits_Bx1xV[:, 0])

    def _loop_fn(self, state, d: Decoding) -> Decoding:
        return jax.lax.while_loop(lambda d: jnp.any(~d.done_B),
                                  lambda d: self._step_fn(state, d), d)

    # ---------------------------------------------------------------- host side

    def prepare(self, requests: list[Request], max_len: int | None = None):
        """Check the requests and lay them out as the prefill's host arrays: (arrays, cache
        length, number of real rows). Rows are padded to at least `min_rows`, and to a
        multiple of the data-parallel size."""
        if not requests:
            raise ConfigError("no prompts: give --prompt, --prompt-file or text on stdin")
        lm = self.lm
        lens = [len(r.prompt_ids) for r in requests]
        for i, n in enumerate(lens):
            if n == 0:
                raise ConfigError(f"prompt {i + 1} is empty: it needs at least one token")
            if lm.context_len is not None and n >= lm.context_len:
                raise ConfigError(f"prompt {i + 1} has {n} tokens, but the model reads at most "
                                  f"{lm.context_len} (its context): shorten it")
        for r in requests:
            r.sampling.validate()
        # seq2seq: the prompt goes to the encoder, the cache holds the decoder's tokens only
        want = max(lm.decoded_len(n) + r.sampling.max_tokens for n, r in zip(lens, requests))
        max_len = cache_len(lm, max(lens), want) if max_len is None else max_len
        P = prompt_len(lm, max(lens), max_len)
        if max(lens) > P:
            raise ConfigError(f"a prompt of {max(lens)} tokens does not fit a cache of {max_len}")
        n_real = len(requests)
        B = round_up(max(n_real, self.min_rows), lm.batch_multiple())
        # a padding row is greedy, so an all-greedy batch keeps skipping the sampling filters'
        # vocabulary sort (sampling.distribution)
        pad = Request([0], SamplingConfig(temperature=0.0, max_tokens=1))
        padded = requests + [pad] * (B - n_real)
        stops = [tuple(r.sampling.stop_ids) + ((self.eos_id,) if self.eos_id is not None else ())
                 for r in padded]
        S = max(1, max(len(s) for s in stops))
        tokens = np.zeros((B, P), np.int32)
        for b, r in enumerate(padded):
            tokens[b, :len(r.prompt_ids)] = np.asarray(r.prompt_ids, np.int32)
        lens_B = np.asarray([len(r.prompt_ids) for r in padded], np.int32)
        decoded_B = np.asarray([lm.decoded_len(n) for n in lens_B], np.int32)
        # a row never writes past the cache: its limit is cut to the room left
        max_B = np.minimum([r.sampling.max_tokens for r in padded], max_len - decoded_B)
        host = {"tokens": tokens, "lens": lens_B, "max": max_B.astype(np.int32),
                "stop": np.asarray([list(s) + [NO_STOP] * (S - len(s)) for s in stops], np.int32),
                "params": RowParams.of([r.sampling for r in padded])}
        return host, max_len, n_real

    def prefill(self, requests: list[Request], max_len: int | None = None):
        host, max_len, n_real = self.prepare(requests, max_len)
        return self._prefill(self.lm.state, host, max_len), n_real

    def step(self, d: Decoding) -> Decoding:
        return self._step(self.lm.state, d)

    def generate(self, requests: list[Request], max_len: int | None = None) -> list[Output]:
        """Every request to its end (a stop token or its limit), in one compiled loop."""
        d, n_real = self.prefill(requests, max_len)
        d = self._loop(self.lm.state, d)
        return outputs(d, n_real)

    def stream(self, request: Request, max_len: int | None = None) -> Iterator[int]:
        """One request's tokens as they are generated (the stop token is not yielded)."""
        d, _ = self.prefill([request], max_len)
        stop = set(np.asarray(d.stop_BxS[0]).tolist())
        n = 0
        while True:
            count, done, tokens = jax.device_get((d.count_B[0], d.done_B[0], d.tokens_BxN[0]))
            for t in tokens[n:count].tolist():
                if done and t in stop:
                    return
                yield t
            n = int(count)
            if done:
                return
            d = self.step(d)


def outputs(d: Decoding, n_real: int) -> list[Output]:
    tokens, count, stop = jax.device_get((d.tokens_BxN, d.count_B, d.stop_BxS))
    out = []
    for b in range(n_real):
        ids = tokens[b, :count[b]].tolist()
        if ids and ids[-1] in set(stop[b].tolist()) - {NO_STOP}:
            out.append(Output(ids[:-1], "stop"))
        else:
            out.append(Output(ids, "length"))
    return out
