"""The serving engine (continuous batching over paged KV, chunked prefill, prefix caching):
outputs equal jaxlm.generate's token for token, for requests arriving at different steps, with
chunked prefill on and off, under preemption, with sampling seeds and penalties; no page leaks;
bad requests get one clear error each."""
import dataclasses

import jax
import pytest

from jaxlm.config_fields import ConfigError
from jaxlm.config_schema import MESH_AXES
from jaxlm.generate.beam import BeamConfig, beam_search
from jaxlm.generate.engine import Engine, Request
from jaxlm.generate.lm import LM
from jaxlm.generate.load import mesh_of
from jaxlm.generate.sampling import SamplingConfig
from jaxlm.serve.engine import QueueFull, ServeConfig, ServingEngine
from jaxlm.serve.step import page_bytes
from test_generate import tiny_lm

SHARED = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5]  # two pages of 4 and a bit: prefix-cache hits
PROMPTS = [SHARED + [11], [5, 9, 2, 33, 17, 8, 1], [40, 3], SHARED + [12, 13, 14],
           list(range(20, 39))]
ARRIVALS = [0, 0, 1, 3, 4]  # the step each request joins at


@pytest.fixture(scope="module")
def lm():
    """On a one-device mesh, as `python -m jaxlm.serve` loads a run."""
    plain = tiny_lm("llama-gqa")[1]
    return LM.of(plain.cfg, plain.state, mesh=mesh_of(None))


def requests(sampling):
    return [Request(p, s) for p, s in zip(PROMPTS, sampling)]


def serve(lm, reqs, arrivals=ARRIVALS, warmup=False, **cfg):
    """Requests joining at their arrival steps; (outputs in request order, engine)."""
    engine = ServingEngine(lm, ServeConfig(**{"page_size": 4, "pages": 40, "max_seqs": 4,
                                              "max_model_len": 64, **cfg}))
    if warmup:
        engine.warmup()
        compiled = engine.device._run._cache_size()
    got, done, step = {i: [] for i in range(len(reqs))}, {}, 0
    while len(done) < len(reqs):
        for i, r in enumerate(reqs):
            if arrivals[i] == step:
                engine.add(str(i), r.prompt_ids, r.sampling)
        for d in engine.step():
            got[int(d.request_id)] += d.token_ids
            if d.finish_reason:
                done[int(d.request_id)] = d.finish_reason
        step += 1
        assert step < 200
    engine.pool.check()
    assert engine.pool.num_used == 0 and not engine.running  # every page came back
    if warmup:  # every step shape was compiled before the first request
        assert engine.device._run._cache_size() == compiled
    return [(got[i], done[i]) for i in range(len(reqs))], engine


def run_choices(engine):
    """Steps until the engine is idle: ({choice index: its tokens}, the indices that finished)."""
    got, done = {}, set()
    while engine.has_work:
        for d in engine.step():
            got.setdefault(d.index, []).extend(d.token_ids)
            if d.finish_reason:
                done.add(d.index)
    return got, done


def expected(lm, reqs):
    return [(o.ids, o.finish_reason) for o in Engine(lm).generate(reqs)]


GREEDY = [SamplingConfig(temperature=0.0, max_tokens=n) for n in (6, 3, 8, 5, 4)]


@pytest.mark.parametrize("cfg", [
    dict(token_budget=8),                                             # chunked, mixed steps
    dict(token_budget=64, chunked_prefill=False, prefix_caching=False),  # whole prompts
])
def test_greedy_equals_generate(lm, cfg):
    reqs = requests(GREEDY)
    got, engine = serve(lm, reqs, warmup=True, **cfg)
    assert got == expected(lm, reqs)
    if cfg.get("prefix_caching", True):  # request 3 shares request 0's two full pages
        assert engine.pool.hits >= 2


def test_sampling_seeds_and_penalties_equal_generate(lm):
    """Sampled tokens depend on the request's seed and its output index only, as in generate;
    penalties read the prompt and output through the device's seen table."""
    sampling = [SamplingConfig(temperature=0.9, top_k=20, seed=s, max_tokens=5) for s in range(3)]
    sampling += [SamplingConfig(temperature=0.7, repetition_penalty=1.5, presence_penalty=0.5,
                                seed=7, max_tokens=6),
                 SamplingConfig(temperature=1.0, top_p=0.8, min_p=0.05, seed=3, max_tokens=4)]
    reqs = requests(sampling)
    got, _ = serve(lm, reqs, token_budget=8, max_seqs=2)  # slots (and their seen rows) reused
    assert got == expected(lm, reqs)


def test_a_reused_slot_forgets_its_last_sequence(lm):
    """One slot, taken in turn: a penalised request must not see the tokens of the request
    that held the slot before it (a strong presence penalty would push them all down)."""
    wide = SamplingConfig(temperature=0.0, max_tokens=3)
    penalised = SamplingConfig(temperature=0.0, presence_penalty=30.0, max_tokens=6)
    reqs = [Request(list(range(3, 60)), wide), Request([5, 9, 2], penalised)]
    got, _ = serve(lm, reqs, arrivals=[0, 0], max_seqs=1, token_budget=64)
    assert got == expected(lm, reqs)


@pytest.mark.parametrize("prompt,sampling", [
    (PROMPTS[0], SamplingConfig(temperature=0.9, seed=4, max_tokens=5)),  # 11 tokens: 3 pages
    ([17], SamplingConfig(temperature=0.9, seed=4, max_tokens=5)),  # forks before any step
    (PROMPTS[1], SamplingConfig(temperature=0.9, presence_penalty=1.0, seed=4, max_tokens=5)),
])
def test_n_choices_share_the_prompt_and_equal_single_requests(lm, prompt, sampling):
    """n=3: choice i is what one request with seed + i gives; the choices share the prompt's
    pages, and the partly filled last one is copied on write, not recomputed (penalised
    requests run as independent sequences)."""
    engine = ServingEngine(lm, ServeConfig(page_size=4, pages=40, max_seqs=4, max_model_len=64,
                                           token_budget=8))
    engine.add("a", prompt, sampling, n=3)
    got, done = run_choices(engine)
    seeds = [Request(prompt, dataclasses.replace(sampling, seed=sampling.seed + i))
             for i in range(3)]
    assert [got[i] for i in range(3)] == [ids for ids, _ in expected(lm, seeds)]
    assert done == {0, 1, 2} and engine.pool.num_used == 0
    shared = sampling.presence_penalty == 0
    assert engine.counters["forked"] == shared
    # 11 prompt tokens: the choices fork after 10, with 2 of the last page's 4 slots filled
    assert engine.counters["copied_pages"] == (2 if shared and len(prompt) % 4 != 1 else 0)
    assert engine.counters["computed_tokens"] == (len(prompt) + 2 if shared else 3 * len(prompt)) \
        + 3 * 4  # each choice's first 4 outputs are fed back (the 5th is not)
    with pytest.raises(ConfigError, match="n=5: expected 1 to 4 choices"):
        engine.add("b", prompt, sampling, n=5)


@pytest.mark.parametrize("beam,eos", [(BeamConfig(3), None),
                                      (BeamConfig(2, length_penalty=0.6), 27),
                                      (BeamConfig(3, early_stopping=True), 21)])
def test_beam_search_equals_generate_and_shares_pages(lm, beam, eos):
    """Beams as paged sequences forked from their parents each round (copy-on-write where
    they share a page): the same best hypothesis, score rules and end as jaxlm.generate's
    beam search; two requests at once, every page back at the end."""
    engine = ServingEngine(lm, ServeConfig(page_size=4, pages=60, max_seqs=6, max_model_len=64,
                                           token_budget=8), eos_id=eos)
    for rid, prompt in (("a", PROMPTS[1]), ("b", PROMPTS[3])):
        engine.add(rid, prompt, SamplingConfig(max_tokens=7), beams=beam)
    got = {}
    while engine.has_work:
        for d in engine.step():
            assert d.finish_reason and d.request_id not in got  # one answer, at the end
            got[d.request_id] = (d.token_ids, d.finish_reason)
    want = {rid: beam_search(lm, p, beam, 7, eos) for rid, p in (("a", PROMPTS[1]),
                                                                   ("b", PROMPTS[3]))}
    assert got == {rid: (r.ids, r.finish_reason) for rid, r in want.items()}
    assert engine.counters["beam_rounds"] > 0 and engine.counters["copied_pages"] > 0
    assert engine.pool.num_used == 0
    engine.pool.check()


def test_preemption_recomputes_and_still_equals_generate(lm):
    """A pool of 12 pages (4 slots each) cannot hold every running sequence to its end: the
    newest are preempted, recomputed on return, and the outputs do not change."""
    reqs = requests([SamplingConfig(temperature=0.0, max_tokens=12)] * 5)
    got, engine = serve(lm, reqs, arrivals=[0] * 5, pages=12, token_budget=16)
    assert engine.counters["preempted"] > 0
    assert got == expected(lm, reqs)


def test_a_data_x_tensor_mesh_serves_what_one_device_does(lm):
    """data=2 x tensor=2: every layer's pages are split over `tensor` by kv head, the paged
    kernel (interpreted) runs per shard, and the tokens equal one device's."""
    sizes = dict.fromkeys(MESH_AXES, 1) | {"data": 2, "tensor": 2}
    lm4 = LM.of(lm.cfg, lm.state, mesh=mesh_of(sizes))
    reqs = requests(GREEDY[:2] + [SamplingConfig(temperature=0.8, seed=3, max_tokens=4)])
    got, engine = serve(lm4, reqs, arrivals=[0, 0, 1], token_budget=8, attention_impl="pallas")
    pages = jax.tree.leaves(engine.device.pools)[0]
    assert pages.sharding.spec[2] == "tensor"
    assert got == expected(lm, reqs)


def test_an_int8_kv_cache_serves_what_generate_decodes_with_one(lm):
    """int8 pages (one float32 scale per stored vector, as generate's int8 cache): the tokens
    equal jaxlm.generate's with an int8 cache, on one device (the reference; prefix-cache hits;
    3 choices forking with a copied page) and on data=2 x tensor=2 (the kernel per shard);
    a page costs int8 values plus their scales."""
    lm8 = LM.of(lm.cfg, lm.state, mesh=mesh_of(None), cache_dtype="int8")
    reqs = requests(GREEDY)
    got, engine = serve(lm8, reqs, token_budget=8)
    assert got == expected(lm8, reqs) and engine.pool.hits >= 2
    G, K = lm.cfg.num_kv_heads, lm.cfg.resolved_head_dim
    per_layer = 2 * engine.cfg.page_size * G * (K + 4)  # keys and values: int8 + a float32 scale
    assert page_bytes(engine.device.pools) == lm.cfg.num_layers * per_layer
    sampling = SamplingConfig(temperature=0.9, seed=4, max_tokens=5)
    engine.add("n", PROMPTS[0], sampling, n=3)
    choices, _ = run_choices(engine)
    seeds = [Request(PROMPTS[0], dataclasses.replace(sampling, seed=4 + i)) for i in range(3)]
    assert [choices[i] for i in range(3)] == [ids for ids, _ in expected(lm8, seeds)]
    assert engine.counters["copied_pages"] >= 1
    sizes = dict.fromkeys(MESH_AXES, 1) | {"data": 2, "tensor": 2}
    lm4 = LM.of(lm.cfg, lm.state, mesh=mesh_of(sizes), cache_dtype="int8")
    got, engine = serve(lm4, reqs[:3], arrivals=[0, 0, 1], token_budget=8,
                        attention_impl="pallas")
    assert got == expected(lm8, reqs[:3])


def test_a_sliding_window_model_serves_what_generate_decodes():
    """A Mistral-style window of 5 keys, shorter than every prompt but one: the paged kernel
    (interpreted) and its reference mask by position and skip pages before the window, and the
    tokens equal jaxlm.generate's (chunked prefill, prefix-cache hits)."""
    windowed = tiny_lm("llama-gqa", extra=["model.sliding_window=5"])[1]
    lm = LM.of(windowed.cfg, windowed.state, mesh=mesh_of(None))
    reqs = requests(GREEDY)
    for impl in ("xla", "pallas"):
        got, engine = serve(lm, reqs, token_budget=8, attention_impl=impl)
        assert got == expected(lm, reqs) and engine.pool.hits >= 2
    assert expected(tiny_lm("llama-gqa")[1], reqs) != got  # the window changed the outputs


def test_stop_tokens_and_abort_free_pages(lm):
    reqs = requests(GREEDY)
    first = expected(lm, reqs[:1])[0][0]
    stop = SamplingConfig(temperature=0.0, max_tokens=6, stop_ids=(first[2],))
    got, _ = serve(lm, [Request(PROMPTS[0], stop)], arrivals=[0], token_budget=8)
    assert got == [(first[:first.index(first[2])], "stop")]
    engine = ServingEngine(lm, ServeConfig(page_size=4, pages=40, max_model_len=64))
    engine.add("a", PROMPTS[1], GREEDY[0])
    engine.add("b", PROMPTS[2], GREEDY[0])
    engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort("a") and engine.abort("b") and not engine.abort("b")
    assert engine.pool.num_used == 0 and not engine.has_work
    engine.pool.check()


def test_bad_requests_get_one_clear_error(lm):
    engine = ServingEngine(lm, ServeConfig(page_size=4, pages=8, max_model_len=32, max_queue=2))
    with pytest.raises(ConfigError, match="prompt is empty"):
        engine.add("x", [])
    with pytest.raises(ConfigError, match="reads at most 32"):
        engine.add("x", list(range(32)))
    with pytest.raises(ConfigError, match=r"token ids must be in \[0, 64\)"):
        engine.add("x", [1, 64])
    with pytest.raises(ConfigError, match="--top-p=1.5"):
        engine.add("x", [1, 2], SamplingConfig(top_p=1.5))
    with pytest.raises(ConfigError, match="more than all 7 KV pages"):
        engine.add("x", [1, 2], SamplingConfig(max_tokens=29))
    short = SamplingConfig(max_tokens=4)
    engine.add("x", [1, 2], short)
    with pytest.raises(ConfigError, match="already in flight"):
        engine.add("x", [3], short)
    engine.add("y", [1, 2], short)
    with pytest.raises(QueueFull):
        engine.add("z", [1, 2], short)
    with pytest.raises(ConfigError, match="chunked_prefill off"):
        ServingEngine(lm, ServeConfig(pages=8, max_model_len=32, token_budget=16,
                                      chunked_prefill=False))
    with pytest.raises(ConfigError, match="serve.page_size=0"):
        ServingEngine(lm, ServeConfig(page_size=0, pages=8))
