"""Beam search (decoder-only or encoder-decoder models), with Hugging Face's rules: each step every beam's
continuations are scored by summed log-probability, the best 2W candidates are taken in order,
those ending in EOS become finished hypotheses (scored sum / generated_len ** length_penalty,
the EOS counted) and the first W others continue. The search ends when W hypotheses are
finished and (early stopping) at once, or when no running beam can still beat the worst of them,
or at the token limit, where the running beams are finished as they are.

The prompt is prefilled once and its cache copied to the W beams; each step the caches of the
beams that continue are gathered (cache.take_rows) before their tokens are fed, in one compiled
function. Candidate selection is on the device; the bookkeeping of finished hypotheses (small) on
the host.
"""
from __future__ import annotations

import dataclasses
import heapq

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config_fields import ConfigError
from jaxlm.generate import cache as kv
from jaxlm.generate.engine import cache_len, prompt_len
from jaxlm.generate.lm import LM


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    width: int
    length_penalty: float = 1.0
    early_stopping: bool = False

    def validate(self) -> "BeamConfig":
        if self.width < 1:
            raise ConfigError(f"--beams={self.width}: expected >= 1")
        return self


@dataclasses.dataclass
class BeamResult:
    ids: list[int]           # the best hypothesis, EOS excluded
    score: float
    finish_reason: str       # "stop" (ended in EOS) or "length"


def _prefill(lm: LM, max_len: int, W: int):
    def fn(state, tokens_1xP, length):
        with lm.rules_scope():
            logits_1xV, cache, _ = lm.prefill(state, tokens_1xP, jnp.reshape(length, (1,)),
                                              max_len)
            return jax.nn.log_softmax(logits_1xV), kv.take_rows(cache, jnp.zeros((W,), jnp.int32))
    return jax.jit(fn)


def _step(lm: LM):
    def fn(state, cache, rows_W, tokens_W, pos):
        with lm.rules_scope():
            cache = kv.take_rows(cache, rows_W)
            W = tokens_W.shape[0]
            logits, cache = lm.forward(state, tokens_W[:, None], jnp.full((W, 1), pos, jnp.int32),
                                       jnp.ones((W, 1), jnp.int32), cache)
            return jax.nn.log_softmax(logits[:, 0]), cache
    return jax.jit(fn, donate_argnums=(1,))


@jax.jit
def candidates(scores_W, logp_WxV):
    """The 2W best (score, beam, token) continuations, best first."""
    W, V = logp_WxV.shape
    total_WxV = scores_W[:, None] + logp_WxV
    best, flat = jax.lax.top_k(total_WxV.reshape(-1), min(2 * W, W * V))
    return best, flat // V, flat % V


class Beams:
    """The host side of one beam search: the W running beams (summed log-probabilities and
    tokens) and the finished hypotheses. Each step's 2W best candidates go in (`advance`); out
    come the parent beam and token each of the W beams continues with, or None once the search
    is over. jaxlm.generate runs it over a dense cache (rows gathered), the serving engine over
    paged sequences (forked)."""

    def __init__(self, c: BeamConfig, max_tokens: int, eos_id: int | None):
        self.c, self.max_tokens, self.eos_id = c, max_tokens, eos_id
        self.scores_W = np.full((c.width,), -np.inf, np.float32)
        self.scores_W[0] = 0.0  # all beams start equal: only the first may be continued at first
        self.seqs: list[list[int]] = [[] for _ in range(c.width)]
        self.finished: list[tuple[float, int, list[int]]] = []  # min-heap of (score, order, ids)
        self.t = 0
        self.done = False

    def _add(self, score_sum, ids):
        item = (score_sum / len(ids) ** self.c.length_penalty, -len(self.finished), ids)
        if len(self.finished) < self.c.width:
            heapq.heappush(self.finished, item)
        elif item[0] > self.finished[0][0]:
            heapq.heapreplace(self.finished, item)

    def advance(self, best, beam, token) -> tuple[list[int], list[int]] | None:
        """The 2W best (score, beam, token) candidates of this step, best first -> (parent
        beam, token) of each of the W beams that continue, or None: the search is over."""
        W, lp, t = self.c.width, self.c.length_penalty, self.t
        rows, toks, new_scores, new_seqs = [], [], [], []
        for rank, (s, b, v) in enumerate(zip(best.tolist(), beam.tolist(), token.tolist())):
            if s == -np.inf:
                break
            if self.eos_id is not None and v == self.eos_id:
                if rank < W:  # an EOS ranked below the W best is not a hypothesis (as in HF)
                    self._add(s, self.seqs[b] + [v])
            elif len(rows) < W:
                rows.append(b), toks.append(v), new_scores.append(s)
                new_seqs.append(self.seqs[b] + [v])
        self.t += 1
        if not rows:
            self.done = True
            return None
        while len(rows) < W:  # fewer live candidates than beams: pad with dead copies
            rows.append(rows[0]), toks.append(toks[0]), new_scores.append(-np.inf)
            new_seqs.append(new_seqs[0])
        self.scores_W, self.seqs = np.asarray(new_scores, np.float32), new_seqs
        if len(self.finished) == W:
            # the best score a running beam could still reach: its sum only falls, its length
            # grows to at most max_tokens
            reach = max(new_scores) / (self.max_tokens if lp > 0 else t + 1) ** lp
            if self.c.early_stopping or reach <= self.finished[0][0]:
                self.done = True
                return None
        return rows, toks

    @property
    def over(self) -> bool:
        """No further step: the search ended, or the beams reached the token limit."""
        return self.done or self.t >= self.max_tokens

    def result(self) -> BeamResult:
        if not self.done:  # the token limit: the running beams are hypotheses as they are
            for s, ids in zip(self.scores_W.tolist(), self.seqs):
                if s > -np.inf:
                    self._add(s, ids)
        score, _, ids = max(self.finished)
        if self.eos_id is not None and ids and ids[-1] == self.eos_id:
            return BeamResult(ids[:-1], score, "stop")
        return BeamResult(ids, score, "length")


def beam_search(lm: LM, prompt_ids, c: BeamConfig, max_tokens: int, eos_id: int | None
                ) -> BeamResult:
    W = c.width
    n = len(prompt_ids)
    if n == 0:
        raise ConfigError("prompt 1 is empty: it needs at least one token")
    if W % lm.batch_multiple():
        raise ConfigError(f"--beams={W}: must be a multiple of the data-parallel size "
                          f"{lm.batch_multiple()} (the beams are the batch rows)")
    if lm.context_len is not None:
        if n >= lm.context_len:
            raise ConfigError(f"prompt 1 has {n} tokens, but the model reads at most "
                              f"{lm.context_len} (its context): shorten it")
    start = lm.decoded_len(n)  # the position of the first generated token
    if lm.context_len is not None:
        max_tokens = min(max_tokens, lm.context_len - start)
    max_len = cache_len(lm, n, start + max_tokens)
    P = prompt_len(lm, n, max_len)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, :n] = prompt_ids
    logp_WxV, cache = _prefill(lm, max_len, W)(lm.state, tokens, np.int32(n))
    logp_WxV = jnp.broadcast_to(logp_WxV, (W, logp_WxV.shape[-1]))
    beams, step_fn = Beams(c, max_tokens, eos_id), _step(lm)
    while not beams.over:
        t = beams.t
        chosen = beams.advance(*jax.device_get(candidates(jnp.asarray(beams.scores_W),
                                                           logp_WxV)))
        if chosen is None or beams.over:
            break
        rows, toks = chosen
        logp_WxV, cache = step_fn(lm.state, cache, np.asarray(rows, np.int32),
                                  np.asarray(toks, np.int32), np.int32(start + t))
    return beams.result()
