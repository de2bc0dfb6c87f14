"""Sampling filters against a NumPy reference, stop strings, and speculative sampling's output
distribution against the target's (exact probabilities by chi-square over fixed seeds)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.generate.sampling import RowParams, SamplingConfig, cut_at_stop, filter_logits, \
    penalize, sample
from jaxlm.generate.speculative import accept
from jaxlm.generate.text import held_back


def np_filter(logits, seen, c: SamplingConfig):
    x = logits.astype(np.float64).copy()
    rp = c.repetition_penalty
    x[seen] = np.where(x[seen] > 0, x[seen] / rp, x[seen] * rp)
    x[seen] -= c.presence_penalty
    x /= c.temperature
    if c.top_k:
        x[x < np.sort(x)[::-1][c.top_k - 1]] = -np.inf
    order = np.argsort(-x, kind="stable")
    p = np.exp(x - x.max())
    p /= p.sum()
    mass, keep = 0.0, np.zeros_like(x, bool)
    for i in order:  # the most likely tokens until their mass reaches top_p
        if mass >= c.top_p and keep.any():
            break
        keep[i], mass = True, mass + p[i]
    x[x < x[keep].min()] = -np.inf
    if c.min_p:
        x[p < c.min_p * p.max()] = -np.inf
    return x


CASES = [SamplingConfig(temperature=0.7, top_k=5),
         SamplingConfig(temperature=1.3, top_p=0.6),
         SamplingConfig(temperature=1.0, min_p=0.2),
         SamplingConfig(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05,
                        repetition_penalty=1.3, presence_penalty=0.5),
         SamplingConfig(temperature=1.0)]


def test_filters_match_numpy():
    rng = np.random.default_rng(0)
    B, V = len(CASES), 40
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    seen = rng.random((B, V)) < 0.3
    p = RowParams.of(CASES)
    got = np.asarray(filter_logits(penalize(jnp.asarray(logits), jnp.asarray(seen), p), p))
    for b, c in enumerate(CASES):
        want = np_filter(logits[b], seen[b], c)
        np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want), err_msg=str(c))
        ok = ~np.isinf(want)
        np.testing.assert_allclose(got[b][ok], want[ok], rtol=1e-5, err_msg=str(c))


def test_sample_draws_from_the_filtered_distribution_and_greedy_is_argmax():
    rng = np.random.default_rng(1)
    V, N = 8, 4000
    logits = rng.normal(0, 1, (V,)).astype(np.float32)
    c = SamplingConfig(temperature=0.8, top_k=4)
    p = jax.tree.map(lambda x: np.repeat(x, N, 0), RowParams.of([c]))
    tokens, _ = jax.jit(sample)(jnp.broadcast_to(logits, (N, V)), jnp.zeros((N, V), bool),
                                jnp.arange(N), p)
    want = np.exp(np_filter(logits, np.zeros(V, bool), c))
    want /= want.sum()
    freq = np.bincount(np.asarray(tokens), minlength=V) / N
    assert np.abs(freq - want).max() < 0.03 and freq[want == 0].sum() == 0
    g = RowParams.of([SamplingConfig(temperature=0.0)])
    tok, _ = sample(jnp.asarray(logits)[None], jnp.zeros((1, V), bool), jnp.zeros(1, int), g)
    assert int(tok[0]) == int(np.argmax(logits))


@pytest.mark.parametrize("bad, flag", [
    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"), (dict(temperature=-1), "--temperature"),
    (dict(top_k=-2), "--top-k"), (dict(min_p=1.0), "--min-p"), (dict(max_tokens=0), "--max-tokens"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"), (dict(stop=("",)), "--stop")])
def test_bad_sampling_settings_name_their_flag(bad, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplingConfig(**bad).validate()


def test_stop_strings_cut_exactly():
    assert cut_at_stop("abc\ndef", ["\n"]) == ("abc", True)
    assert cut_at_stop("x = 1;y", [";", "x"]) == ("", True)   # the earliest match wins
    assert cut_at_stop("no stop", ["END"]) == ("no stop", False)
    assert held_back("value EN", ["END"]) == 2 and held_back("value", ["END"]) == 0


def _bigram(seed, V, sharp):
    rng = np.random.default_rng(seed)
    t = np.exp(sharp * rng.normal(size=(V, V)))
    return t / t.sum(1, keepdims=True)


def test_speculative_sampling_keeps_the_target_distribution():
    """A bigram target p and a different bigram draft q over V=4 tokens, K=2 drafts per round.
    Over 20,000 fixed seeds, the first two tokens out of speculative rounds (a second round when
    the first emits one token) match p(x1|s) p(x2|x1) by chi-square (15 dof; the 1e-4 critical
    value is 44.3); the drafts' own distribution is far from it (which this test tells apart)."""
    V, K, N, s0 = 4, 2, 20000, 0
    P, Q = _bigram(0, V, 1.5), _bigram(1, V, 1.5)
    logP, logQ = jnp.log(P), jnp.log(Q)

    def round_(key, last):
        k1, k2 = jax.random.split(key)
        d1 = jax.random.categorical(k1, logQ[last])
        d2 = jax.random.categorical(k2, logQ[d1])
        drafts = jnp.stack([d1, d2]).astype(jnp.int32)
        n, nxt = accept(logP[jnp.stack([last, d1, d2])], logQ[jnp.stack([last, d1])], drafts,
                        jax.random.fold_in(key, 9))
        out = jnp.where(jnp.arange(3) < n, jnp.concatenate([drafts, drafts[:1]]),
                        jnp.where(jnp.arange(3) == n, nxt, -1))
        return out, n + 1, drafts

    def two_tokens(key):
        out, m, drafts = round_(jax.random.fold_in(key, 0), jnp.int32(s0))
        nxt, _, _ = round_(jax.random.fold_in(key, 1), out[0])
        return out[0], jnp.where(m >= 2, out[1], nxt[0]), drafts

    x1, x2, drafts = jax.jit(jax.vmap(two_tokens))(jax.random.split(jax.random.key(3), N))
    counts = np.bincount(np.asarray(x1) * V + np.asarray(x2), minlength=V * V)
    expect = (P[s0][:, None] * P).reshape(-1) * N
    chi2 = ((counts - expect) ** 2 / expect).sum()
    assert chi2 < 44.3, chi2
    d = np.asarray(drafts)
    draft_counts = np.bincount(d[:, 0] * V + d[:, 1], minlength=V * V)
    assert ((draft_counts - expect) ** 2 / expect).sum() > 44.3  # the test can fail
