"""Sampling: what turns one step's logits into the next token, per row.

Every setting is a per-row array (rows of one batch may sample differently), so one compiled
decode step serves any mix of requests. Order, as in Hugging Face's processors: repetition and
presence penalties over the tokens a row has seen (prompt included), temperature, top-k, top-p,
min-p. Temperature 0 is greedy (argmax of the penalised logits). A row's randomness is
fold_in(key(seed), index of the token in its output): the same request with the same seed gives
the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.config_fields import ConfigError

FILTERED = -jnp.inf  # a token no filter keeps gets probability exactly 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One request's settings, as the CLI flags name them (0 / 1.0: that filter is off)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    max_tokens: int = 64
    seed: int = 0
    stop: tuple[str, ...] = ()         # stop strings: the text is cut before the first one
    stop_ids: tuple[int, ...] = ()     # stop tokens (the tokenizer's eos is added by the engine)

    def validate(self) -> "SamplingConfig":
        checks = [
            (self.temperature >= 0, "--temperature", self.temperature, ">= 0 (0: greedy)"),
            (self.top_k >= 0, "--top-k", self.top_k, ">= 0 (0: off)"),
            (0 < self.top_p <= 1, "--top-p", self.top_p, "in (0, 1]"),
            (0 <= self.min_p < 1, "--min-p", self.min_p, "in [0, 1)"),
            (self.repetition_penalty > 0, "--repetition-penalty", self.repetition_penalty,
             "> 0 (1: off)"),
            (self.max_tokens >= 1, "--max-tokens", self.max_tokens, ">= 1"),
            (0 <= self.seed < 2**31, "--seed", self.seed, "in [0, 2**31)"),
            (all(self.stop), "--stop", self.stop, "non-empty strings"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag}={value!r}: expected {expected}")
        return self


@struct.dataclass
class RowParams:
    """SamplingConfigs of a batch as per-row arrays."""
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    min_p_B: jax.Array
    repetition_B: jax.Array
    presence_B: jax.Array
    seed_B: jax.Array

    @classmethod
    def of(cls, configs: list[SamplingConfig]) -> "RowParams":
        col = lambda name, dt: np.asarray([getattr(c, name) for c in configs], dt)  # noqa: E731
        return cls(col("temperature", np.float32), col("top_k", np.int32), col("top_p", np.float32),
                   col("min_p", np.float32), col("repetition_penalty", np.float32),
                   col("presence_penalty", np.float32), col("seed", np.uint32))


def penalize(logits_BxV, seen_BxV, p: RowParams):
    """Repetition penalty (a seen token's logit divided by it if positive, multiplied if not)
    and presence penalty (subtracted once from every seen token's logit)."""
    rep_Bx1 = p.repetition_B[:, None]
    penalised = jnp.where(logits_BxV > 0, logits_BxV / rep_Bx1, logits_BxV * rep_Bx1)
    logits_BxV = jnp.where(seen_BxV, penalised, logits_BxV)
    return logits_BxV - p.presence_B[:, None] * seen_BxV


def filter_logits(logits_BxV, p: RowParams):
    """Temperature, then top-k (ties with the k-th value are kept), top-p (the smallest set of
    most likely tokens whose mass reaches p; the most likely always stays) and min-p (tokens at
    least min_p times the most likely's probability). Filtered tokens get -inf."""
    V = logits_BxV.shape[-1]
    t_Bx1 = jnp.where(p.temperature_B > 0, p.temperature_B, 1.0)[:, None]
    logits_BxV = logits_BxV / t_Bx1
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    k_B = jnp.where(p.top_k_B > 0, jnp.minimum(p.top_k_B, V), V)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, k_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, FILTERED)
    sorted_BxV = jnp.where(jnp.arange(V) < k_B[:, None], sorted_BxV, FILTERED)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
    keep_BxV = (before_BxV < p.top_p_B[:, None]) | (jnp.arange(V) == 0)
    # the least likely kept logit: everything at least as likely stays (ties kept, like top-k)
    cut_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cut_Bx1, logits_BxV, FILTERED)
    # min-p in log space: logit >= max + log(min_p)
    floor_Bx1 = sorted_BxV[:, :1] + jnp.log(jnp.maximum(p.min_p_B, 1e-30))[:, None]
    return jnp.where((p.min_p_B[:, None] <= 0) | (logits_BxV >= floor_Bx1), logits_BxV, FILTERED)


def row_keys(seed_B, index_B):
    """The key of each row's token number index: independent of the batch it runs in."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, index_B)


def distribution(logits_BxV, seen_BxV, p: RowParams):
    """The log-probabilities [B, V] each row samples from: penalised and filtered; a greedy row
    (temperature 0) gets a point mass on its argmax."""
    logits_BxV = penalize(logits_BxV.astype(jnp.float32), seen_BxV, p)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    point_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) == greedy_B[:, None], 0.0, FILTERED)
    is_greedy_B = p.temperature_B <= 0
    # an all-greedy batch (the benchmark's) skips the sort the filters need
    return jax.lax.cond(jnp.all(is_greedy_B), lambda: point_BxV, lambda: jnp.where(
        is_greedy_B[:, None], point_BxV, jax.nn.log_softmax(filter_logits(logits_BxV, p), -1)))


def sample(logits_BxV, seen_BxV, index_B, p: RowParams, tag: int = 0):
    """The next token of every row [B] int32 (its `index_B`-th output token) and the
    log-probabilities it was drawn from. `tag` separates independent draws of one index
    (speculative decoding's draft, acceptance and resampling)."""
    logp_BxV = distribution(logits_BxV, seen_BxV, p)
    keys = row_keys(p.seed_B, index_B)
    if tag:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)
    token_B = jax.vmap(jax.random.categorical)(keys, logp_BxV).astype(jnp.int32)
    return token_B, logp_BxV


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)
