"""The OpenAI API's shapes, as the server speaks them: request bodies (pydantic), the checks
that turn them into a SamplingConfig, response and stream-chunk objects, and errors.

Clients are written against OpenAI's API, so everything a client reads follows it: errors are
`{"error": {"message", "type", "param", "code"}}`, streams are Server-Sent Events ending in
`data: [DONE]`. What this server cannot do (logprobs, echo, best_of, ...) is refused with a 400
naming the parameter rather than silently ignored; unknown parameters are refused the same way,
so a typo never passes for a default. `n` (1 to MAX_N) asks for several choices of one prompt:
choice i samples with seed `seed + i`, so choice 0 is what the same request with n=1 gives; a
stream's chunks each carry one choice, named by its `index`. vLLM's `use_beam_search` extension
(completions only) runs beam search of width `best_of` (default 4) with `length_penalty` and
`early_stopping` instead of sampling, and answers one choice: the best hypothesis.
"""
from __future__ import annotations

import json
import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxlm.config_fields import ConfigError
from jaxlm.generate.beam import BeamConfig
from jaxlm.generate.sampling import SamplingConfig

MAX_STOPS = 16
MAX_N = 16  # choices per request
MAX_BEAMS, DEFAULT_BEAMS = 16, 4  # use_beam_search: the beam width (best_of)
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code=code)


# ---------------------------------------------------------------- request bodies

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False


class GenerationRequest(BaseModel):
    """Parameters both endpoints take. None means "not given" (clients may send null)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None               # extension (0: off)
    min_p: float | None = None             # extension (0: off)
    repetition_penalty: float | None = None  # extension (1: off)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None  # only 0
    seed: int | None = None
    stop: Any = None                       # a string or a list of strings
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None                   # choices: 1 to MAX_N
    logit_bias: dict[str, float] | None = None  # only empty
    user: str | None = None                # accepted, unused


class CompletionRequest(GenerationRequest):
    prompt: Any = None                     # a string, a list of one string, or token ids
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None             # with use_beam_search: the beam width
    suffix: str | None = None
    use_beam_search: bool | None = None    # extensions (vLLM's): beam search, one choice
    length_penalty: float | None = None
    early_stopping: bool | None = None


class ChatRequest(GenerationRequest):
    messages: Any = None                   # [{"role", "content"}]: checked by chat_messages
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def describe_validation(errors) -> ApiError:
    """pydantic's (or FastAPI's) first complaint about a body as one 400 naming the field."""
    e = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": ""}
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return bad(f"the request body is not valid JSON ({detail})", code="invalid_json")
    if not loc:  # no body, or not an object
        return bad("the request body must be a JSON object with the request's parameters")
    param = ".".join(loc)
    if kind == "extra_forbidden":
        return bad(f"{param}: this endpoint takes no such parameter", param)
    if kind == "missing":
        return bad(f"{param}: required", param)
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return bad(f"{param}={shown}: {e.get('msg', 'invalid')}", param)


def check_supported(req: GenerationRequest):
    """OpenAI parameters this server does not implement: a 400 unless left at their default."""
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise bad(f"n={req.n}: expected 1 to {MAX_N} choices per request", "n")
    if req.frequency_penalty not in (None, 0):
        raise bad(f"frequency_penalty={req.frequency_penalty}: not supported (only 0); "
                  f"presence_penalty and repetition_penalty are", "frequency_penalty")
    if req.logit_bias:
        raise bad("logit_bias: not supported", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad("echo=true: not supported", "echo")
        if req.logprobs is not None:
            raise bad(f"logprobs={req.logprobs}: log-probabilities are not returned", "logprobs")
        if req.use_beam_search:
            if req.n not in (None, 1):
                raise bad(f"n={req.n}: use_beam_search answers one choice (n=1)", "n")
            if req.best_of is not None and not 1 <= req.best_of <= MAX_BEAMS:
                raise bad(f"best_of={req.best_of}: expected a beam width of 1 to {MAX_BEAMS}",
                          "best_of")
        else:
            if req.best_of not in (None, 1):
                raise bad(f"best_of={req.best_of}: not supported (only 1) without "
                          f"use_beam_search=true", "best_of")
            for name in ("length_penalty", "early_stopping"):
                if getattr(req, name) is not None:
                    raise bad(f"{name}: only with use_beam_search=true", name)
        if req.suffix:
            raise bad("suffix: insertion (text after the completion) is not supported",
                      "suffix")
    if isinstance(req, ChatRequest) and (req.logprobs or req.top_logprobs):
        raise bad("logprobs: log-probabilities are not returned", "logprobs")


def completion_prompt(req: CompletionRequest, tokenizer) -> list[int]:
    """The prompt's token ids: a string, a list of exactly one string, or a list of ids."""
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [int(t) for t in tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if prompt is None:
        raise bad("prompt: required", "prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise bad(f"prompt: a list of {len(prompt)} strings; this server takes one prompt per "
                  f"request (send one request each)", "prompt")
    raise bad("prompt: expected a string, a list of one string, or a list of token ids",
              "prompt")


def chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as {"role", "content"} dicts (content parts of type text joined)."""
    messages = req.messages
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a non-empty list of {\"role\", \"content\"} objects",
                  "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where}: expected an object with role and content", where)
        if m.get("role") not in ROLES:
            raise bad(f"{where}.role={m.get('role')!r}: expected one of {', '.join(ROLES)}",
                      f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": "
                          f"...}}) are served", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content: expected a string or a list of text parts",
                      f"{where}.content")
        out.append({**{k: v for k, v in m.items() if k not in ("role", "content")},
                    "role": m["role"], "content": content})
    return out


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop: expected a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop: {len(stops)} stop strings; at most {MAX_STOPS}", "stop")
    return tuple(stops)


def beams_of(req: GenerationRequest) -> BeamConfig | None:
    """use_beam_search's BeamConfig (check_supported has bounded best_of), else None."""
    if not (isinstance(req, CompletionRequest) and req.use_beam_search):
        return None
    return BeamConfig(DEFAULT_BEAMS if req.best_of is None else req.best_of,
                      1.0 if req.length_penalty is None else req.length_penalty,
                      bool(req.early_stopping))


def choices_of(req: GenerationRequest) -> int:
    """How many choices the request asks for (check_supported has bounded it)."""
    return 1 if req.n is None else req.n


def sampling_of(req: GenerationRequest, max_tokens: int) -> SamplingConfig:
    """The request's SamplingConfig; a bad value is a 400 naming the OpenAI parameter. No seed:
    a fresh random one (two identical requests sample differently, as OpenAI's do)."""
    given = lambda value, default: default if value is None else value  # noqa: E731
    config = SamplingConfig(
        temperature=given(req.temperature, 1.0), top_k=given(req.top_k, 0),
        top_p=given(req.top_p, 1.0), min_p=given(req.min_p, 0.0),
        repetition_penalty=given(req.repetition_penalty, 1.0),
        presence_penalty=given(req.presence_penalty, 0.0), max_tokens=max_tokens,
        seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
        stop=stop_strings(req.stop))
    try:
        return config.validate()
    except ConfigError as e:  # its messages name CLI flags (--top-p): name the API's fields
        message = re.sub(r"--([a-z-]+)", lambda m: m[1].replace("-", "_"), str(e))
        raise bad(message, message.split("=", 1)[0]) from None


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, choices: list[tuple[str, str | None]],
               used: dict | None = None, chunk: bool = False, first_index: int = 0) -> dict:
    """A whole answer (choices: (text, finish_reason) by index) or, with chunk, one stream
    chunk (one choice, numbered first_index)."""
    body = {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": first_index + i, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}
                        for i, (text, finish_reason) in enumerate(choices)]}
    if not chunk:
        body["usage"] = used
    return body


def chat(id: str, created: int, model: str, choices: list[tuple[str, str | None]],
         used: dict | None = None) -> dict:
    """A whole answer; choices: (text, finish_reason) by index."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}
                        for i, (text, finish_reason) in enumerate(choices)],
            "usage": used}


def chat_chunk(id: str, created: int, model: str, delta: dict, finish_reason: str | None,
               index: int = 0) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk(id: str, created: int, model: str, object: str, used: dict) -> dict:
    """stream_options.include_usage: the last chunk, with no choices."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [],
            "usage": used}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
