"""The OpenAI-compatible server (jaxlm.serve.server) on 127.0.0.1, driven by the real `openai`
client and raw HTTP: greedy text equals jaxlm.generate's, stop strings cut exactly and free the
request's pages, SSE streams end with a finish chunk and [DONE], /metrics counts what happened,
every bad request is one 400 naming the problem, a full queue is a 429, an engine step that
raises fails only the requests in flight, and 200 concurrent streams (a fifth of their clients
walking away mid-stream) leave no request or page behind. use_beam_search (vLLM's extension)
gives jaxlm.generate.beam's best hypothesis."""
import asyncio
import dataclasses
import json
import random
import socket
import string
import threading
import time

import httpx2
import jax
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from jaxlm.config_fields import ConfigError
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.generate.beam import BeamConfig, beam_search
from jaxlm.generate.engine import Engine, Request
from jaxlm.generate.sampling import SamplingConfig, cut_at_stop
from jaxlm.generate.text import TextStream
from jaxlm.serve.chat import ChatTemplate
from jaxlm.serve.engine import ServeConfig, ServingEngine
from jaxlm.serve.server import build_app
from test_generate import tiny_lm

MODEL = "tiny"
PROMPT = "The quick brown fox"


class Served:
    def __init__(self, app, port, lm, tok):
        self.app, self.server, self.lm, self.tok = app, app.state.server, lm, tok
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    def stats(self) -> dict:
        return self.server.loop.call(lambda engine: engine.stats()).result(timeout=30)

    def wait_idle(self, timeout=15.0) -> dict:
        """Engine stats once nothing runs, waits or holds a page (aborts land between steps)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = not stats["running"] and not stats["waiting"] and stats["pages_used"] == 0
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    def metrics(self) -> dict:
        """{sample name (+labels): value} from /metrics."""
        text = httpx2.get(self.url + "/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def greedy(self, prompt: str, max_tokens: int) -> tuple[str, str]:
        """What jaxlm.generate gives for the prompt: (text, finish_reason)."""
        out = Engine(self.lm, self.tok.eos_id).generate(
            [Request(self.tok.encode(prompt), SamplingConfig(temperature=0.0,
                                                             max_tokens=max_tokens))])[0]
        return self.tok.decode(out.ids), out.finish_reason


@pytest.fixture(scope="module")
def served():
    tok = ByteTokenizer()
    lm = tiny_lm("llama-gqa", extra=["model.vocab_size=259"])[1]  # covers the byte tokens
    engine = ServingEngine(lm, ServeConfig(page_size=4, pages=400, max_seqs=16, token_budget=64,
                                           max_model_len=64), eos_id=tok.eos_id)
    app = build_app(engine, tok, MODEL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield Served(app, sock.getsockname()[1], lm, tok)
    server.should_exit = True
    thread.join(30)
    assert not app.state.server.loop.alive  # the lifespan shut the engine thread down


def test_greedy_completion_equals_generate_streamed_or_not(served):
    want_text, want_reason = served.greedy(PROMPT, 12)
    before = served.metrics()
    r = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want_text, want_reason)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.total_tokens == len(PROMPT) + \
        r.usage.completion_tokens
    chunks = list(served.client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=12,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want_text
    assert [c.choices[0].finish_reason for c in chunks][-1] == want_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    after = served.metrics()
    assert after["jaxlm_time_to_first_token_seconds_count"] == \
        before["jaxlm_time_to_first_token_seconds_count"] + 2  # one per request served
    reason = f"jaxlm_requests_finished_total{{finish_reason={want_reason}}}"
    assert after[reason] == before.get(reason, 0) + 2


def test_stop_string_cuts_exactly_and_frees_pages(served):
    full, _ = served.greedy(PROMPT, 40)
    at = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[at:at + 2]
    want = cut_at_stop(full, [stop])[0]
    aborted = served.stats().get("aborted", 0)
    r = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                         temperature=0, stop=["never-there", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                                   temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    stats = served.wait_idle()
    # both were dropped from the engine at the stop string, not run on to max_tokens
    assert stats["pages_used"] == 0 and stats.get("aborted", 0) == aborted + 2


def test_chat_fallback_template_streamed_or_not(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want, reason = served.greedy("system: Be brief.\nuser: Hi\nassistant:", 8)
    r = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                              temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, reason)
    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_n_choices_are_the_single_requests_with_seed_plus_i(served):
    """n=3 gives choice i what n=1 with seed 5+i gives, stop strings cutting each choice on its
    own; one time-to-first-token per request; usage sums the choices; no page is left held."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8)
    answers = [served.client.completions.create(seed=5 + i, **kw) for i in range(3)]
    singles = [a.choices[0] for a in answers]
    ttft = "jaxlm_time_to_first_token_seconds_count"
    before = served.metrics()[ttft]
    r = served.client.completions.create(n=3, seed=5, **kw)
    assert served.metrics()[ttft] == before + 1
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [(c.text, c.finish_reason) for c in r.choices] == \
        [(c.text, c.finish_reason) for c in singles]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in answers)
    assert r.usage.prompt_tokens == len(PROMPT)
    # a stop string from choice 0's text: each choice is cut (or not) as its single request is
    text = singles[0].text
    at = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    kw["stop"] = text[at:at + 2]
    singles = [served.client.completions.create(seed=5 + i, **kw).choices[0] for i in range(3)]
    r = served.client.completions.create(n=3, seed=5, **kw)
    assert [(c.text, c.finish_reason) for c in r.choices] == \
        [(c.text, c.finish_reason) for c in singles]
    assert r.choices[0].finish_reason == "stop"
    assert served.wait_idle()["pages_used"] == 0


def test_n_choices_stream_one_choice_per_chunk(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0.8, "seed": 3, "n": 2}
    whole = httpx2.post(served.url + "/v1/chat/completions", json=body).json()
    with httpx2.stream("POST", served.url + "/v1/chat/completions",
                       json={**body, "stream": True}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(len(c["choices"]) == 1 for c in chunks)
    got = {0: [], 1: []}
    for c in chunks:
        got[c["choices"][0]["index"]].append(c["choices"][0])
    for i, choices in got.items():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        reasons = [c["finish_reason"] for c in choices]
        assert reasons[-1] in ("stop", "length") and not any(reasons[:-1]), reasons
        want = whole["choices"][i]
        assert "".join(c["delta"].get("content", "") for c in choices) == \
            want["message"]["content"]
        assert reasons[-1] == want["finish_reason"]


def test_beam_search_equals_generate_beam_streamed_or_not(served):
    want = beam_search(served.lm, served.tok.encode(PROMPT), BeamConfig(3, 0.8), 12,
                       served.tok.eos_id)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12,
              extra_body={"use_beam_search": True, "best_of": 3, "length_penalty": 0.8})
    r = served.client.completions.create(**kw)
    assert [(c.text, c.finish_reason) for c in r.choices] == \
        [(served.tok.decode(want.ids), want.finish_reason)]
    assert r.usage.completion_tokens == len(want.ids)
    chunks = list(served.client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == want.finish_reason
    assert served.wait_idle()["pages_used"] == 0


def test_chat_template_from_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                "{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    chat = ChatTemplate.beside(tmp_path / "tokenizer.json")
    assert chat.render([{"role": "user", "content": "hi"}]) == "<s><|user|>hi<|assistant|>"
    with pytest.raises(ConfigError, match="no tools"):
        chat.render([{"role": "tool", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert ChatTemplate.beside(tmp_path / "tokenizer.json").render(
        [{"role": "user", "content": "hi"}]) == "hi!"
    assert ChatTemplate.beside(None).render([{"role": "user", "content": "a"}]) == \
        "user: a\nassistant:"
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    text = TextStream(ByteTokenizer(), ["END"])
    ids = [int(t) for t in ByteTokenizer().encode("ab€ EN")]
    assert text.push(ids[:3]) == "ab" and text.push(ids[3:5]) == "€"  # 3 bytes: held till whole
    assert text.push(ids[5:]) == " " and text.finish() == "EN"      # "EN" could begin "END"
    text = TextStream(ByteTokenizer(), ["END"])
    assert text.push(ids + [int(t) for t in ByteTokenizer().encode("Dx")]) == "ab€ "
    assert text.stopped and text.push([70]) == "" and text.finish() == ""


def test_health_and_models(served):
    assert httpx2.get(served.url + "/health").json() == {"status": "ok"}
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    m = served.metrics()
    assert m["jaxlm_kv_pages_total"] == 399 and m["jaxlm_requests_running"] == 0
    for name in ("jaxlm_kv_pool_usage", "jaxlm_kv_waste", "jaxlm_prefix_hit_rate",
                 "jaxlm_generation_tokens_per_second", "jaxlm_generated_tokens_total",
                 "jaxlm_inter_token_latency_seconds_count", "jaxlm_requests_waiting",
                 "jaxlm_kv_pages_used"):
        assert name in m, name


BAD = {  # case: (endpoint, body, text the message must hold)
    "empty prompt": ("completions", {"prompt": ""}, "prompt is empty"),
    "prompt beyond the context": ("completions", {"prompt": "x" * 70}, "reads at most 64"),
    "top_p 0": ("completions", {"prompt": "a", "top_p": 0}, "top_p=0"),
    "top_p 1.5": ("completions", {"prompt": "a", "top_p": 1.5}, "top_p=1.5: expected in (0, 1]"),
    "unknown model": ("completions", {"prompt": "a", "model": "gpt-9"}, "model='gpt-9'"),
    "n=0": ("completions", {"prompt": "a", "n": 0}, "n=0: expected 1 to 16"),
    "n=17": ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 17},
             "n=17: expected 1 to 16"),
    "two prompts": ("completions", {"prompt": ["a", "b"]}, "one prompt per request"),
    "frequency penalty": ("completions", {"prompt": "a", "frequency_penalty": 0.5},
                          "frequency_penalty=0.5"),
    "echo": ("completions", {"prompt": "a", "echo": True}, "echo"),
    "logprobs": ("completions", {"prompt": "a", "logprobs": 2}, "logprobs=2"),
    "best_of": ("completions", {"prompt": "a", "best_of": 3}, "best_of=3"),
    "beam search n=2": ("completions", {"prompt": "a", "use_beam_search": True, "n": 2},
                        "n=2: use_beam_search"),
    "beam width 0": ("completions", {"prompt": "a", "use_beam_search": True, "best_of": 0},
                     "best_of=0: expected a beam width of 1 to 16"),
    "length_penalty without beams": ("completions", {"prompt": "a", "length_penalty": 0.8},
                                     "length_penalty: only with use_beam_search"),
    "unknown parameter": ("completions", {"prompt": "a", "temprature": 0}, "temprature"),
    "max_tokens not a number": ("completions", {"prompt": "a", "max_tokens": "many"},
                                "max_tokens"),
    "max_tokens 0": ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens=0"),
    "negative temperature": ("completions", {"prompt": "a", "temperature": -1}, "temperature"),
    "empty stop": ("completions", {"prompt": "a", "stop": [""]}, "stop"),
    "token id out of range": ("completions", {"prompt": [1, 999]}, "token ids"),
    "no messages": ("chat/completions", {"messages": []}, "messages"),
    "bad role": ("chat/completions", {"messages": [{"role": "bot", "content": "x"}]},
                 "messages[0].role='bot'"),
    "image part": ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "only text parts"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_one_clear_400(served, case):
    endpoint, body, needle = BAD[case]
    r = httpx2.post(f"{served.url}/v1/{endpoint}", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_and_openai_client_errors(served):
    rejected = "jaxlm_requests_rejected_total{reason=invalid}"
    before = served.metrics().get(rejected, 0)
    r = httpx2.post(served.url + "/v1/completions", content=b'{"prompt": "a",',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_p=1.5"):
        served.client.completions.create(model=MODEL, prompt="a", top_p=1.5)
    assert httpx2.get(served.url + "/v2/nothing").json()["error"]["message"] == "Not Found"
    assert served.metrics()[rejected] == before + 2


def test_full_queue_is_429(served):
    """The engine thread is held while two requests queue, with room for one waiting."""
    holding, gate, cfg = threading.Event(), threading.Event(), served.server.loop.engine.cfg

    def hold(e):
        e.cfg = dataclasses.replace(cfg, max_queue=1)
        holding.set()
        gate.wait(30)

    async def two():
        async with httpx2.AsyncClient(base_url=served.url, timeout=30) as client:
            posts = [asyncio.create_task(client.post("/v1/completions", json={
                "model": MODEL, "prompt": "abc", "max_tokens": 2})) for _ in range(2)]
            while served.server.loop.queued_commands < 2:
                await asyncio.sleep(0.01)
            gate.set()
            return await asyncio.gather(*posts)

    held = served.server.loop.call(hold)
    assert holding.wait(30)
    try:
        answers = asyncio.run(two())
    finally:
        gate.set()
        held.result(30)
        served.server.loop.call(lambda e: setattr(e, "cfg", cfg)).result(30)
    assert sorted(r.status_code for r in answers) == [200, 429]
    busy = next(r for r in answers if r.status_code == 429).json()["error"]
    assert "max_queue" in busy["message"] and busy["code"] == "rate_limit_exceeded"
    assert served.wait_idle()["pages_used"] == 0


def test_engine_failure_fails_requests_in_flight_and_serving_goes_on(served):
    def break_next_step(engine):
        def failing():
            del engine.step  # back to the real one
            raise RuntimeError("injected step failure")
        engine.step = failing

    served.server.loop.call(break_next_step).result(30)
    with pytest.raises(openai.APIError, match="injected step failure"):
        list(served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                              stream=True))
    assert served.wait_idle()["pages_used"] == 0
    r = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert served.metrics()["jaxlm_requests_failed_total"] == 1
    assert served.server.loop.step_failures == 1


def test_client_leaving_a_whole_answer_aborts_it(served):
    """A non-streamed request whose client times out is dropped from the engine at once."""
    def slow(engine):
        real = type(engine).step
        engine.step = lambda: (time.sleep(0.05), real(engine))[1]

    served.server.loop.call(slow).result(30)
    before = served.stats()
    try:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(served.url + "/v1/completions", timeout=0.4, json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 40})
        stats = served.wait_idle()
    finally:
        served.server.loop.call(lambda e: e.__dict__.pop("step", None)).result(30)
    assert stats["aborted"] == before["aborted"] + 1
    assert stats["pages_used"] == 0 and not stats["running"]
    # cut short: far fewer than its 40 tokens (a loaded machine may slow the abort, not stop it)
    assert stats["generated_tokens"] - before["generated_tokens"] < 30


def test_200_concurrent_streams_with_clients_leaving(served):
    aborted_before = served.metrics()["jaxlm_requests_aborted_total"]

    async def one(client, i):
        rng = random.Random(i)
        prompt = "".join(rng.choice(string.ascii_letters + " ") for _ in range(rng.randint(1, 40)))
        leave_after = rng.randint(0, 2) if rng.random() < 0.2 else None
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=rng.randint(2, 12), stream=True,
            temperature=rng.choice([0.0, 0.8]), seed=i)
        reasons = []
        async for chunk in stream:
            if leave_after is not None and len(reasons) >= leave_after:
                await stream.close()
                return "left"
            reasons.append(chunk.choices[0].finish_reason)
        assert reasons[-1] in ("stop", "length") and not any(reasons[:-1]), reasons
        return reasons[-1]

    async def load():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x",
                                      max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    # each engine step a few ms longer: a leaving client's request is still running when the
    # server sees it go (else a fast machine finishes all 2-12 tokens first and none is aborted,
    # seen once in CI)
    def slow(engine):
        real = type(engine).step
        engine.step = lambda: (time.sleep(0.005), real(engine))[1]

    served.server.loop.call(slow).result(30)
    start = time.monotonic()
    try:
        outcomes = asyncio.run(load())
    finally:
        served.server.loop.call(lambda e: e.__dict__.pop("step", None)).result(30)
    elapsed = time.monotonic() - start
    left = outcomes.count("left")
    assert 20 <= left <= 60 and len(outcomes) - left == outcomes.count("stop") + \
        outcomes.count("length")
    stats = served.wait_idle()
    assert (stats["running"], stats["waiting"], stats["pages_used"]) == (0, 0, 0), stats
    served.server.loop.call(lambda engine: engine.pool.check()).result(30)
    assert httpx2.get(served.url + "/health").status_code == 200
    aborted = served.metrics()["jaxlm_requests_aborted_total"] - aborted_before
    assert 0 < aborted <= left, (aborted, left, elapsed)


def test_cli_builds_the_app_from_a_run_and_bad_flags_are_one_line(tmp_path, capsys):
    from jaxlm.serve.cli import build, main, parse_args
    from test_generate_cli import LLAMA, make_run
    make_run(tmp_path, LLAMA)  # context: data.seq_len=32
    app = build(parse_args(["--run", str(tmp_path), "--pages", "20", "--page-size", "4",
                            "--max-queue", "3", "--model-name", "m", "--cache-dtype", "int8"]))
    server = app.state.server
    assert (server.model_name, server.max_len, server.loop.engine.cfg.max_queue) == ("m", 32, 3)
    assert str(jax.tree.leaves(server.loop.engine.device.pools)[0].dtype) == "int8"
    assert not server.loop.alive  # the engine thread starts with the app, not before
    for argv, needle in [(["--max-model-len", "99"], "--max-model-len=99: the model reads at "
                                                     "most 32"),
                         (["--max-seqs", "0"], "--max-seqs=0: expected >= 1"),
                         (["--step", "7"], "--step 7")]:
        assert main(["--run", str(tmp_path), "--pages", "20", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
