"""An OpenAI-compatible HTTP server over the serving engine (FastAPI, served by uvicorn).

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as Server-Sent Events or
answered whole, with usage), GET /v1/models, /health and /metrics (Prometheus).

The engine runs on its own thread (jaxlm.serve.loop); each request here is a `Pending`: the
engine thread drops the request's deltas into its asyncio queue, and the handler turns them
into text with the same TextStream the CLI streams with (stop strings cut exactly, text that
could begin one held back). A stop string ends the request in the engine at once, and so does
a client that goes away: a watcher task waits on the connection's `http.disconnect` for the
whole life of the request, so the engine's pages come back whether the client left while its
answer streamed or while it waited for a whole one.

A request with n > 1 (parallel sampling) has n choices, each with its own TextStream and its
own finish. The engine cannot end one choice alone, so a stop string in a choice only ends
what the client sees of it (later tokens of that choice are dropped here); once every choice
has finished the request is aborted in the engine if any choice still runs there. Streams send
each chunk with one choice, named by its index; whole answers list the choices by index, and
usage counts the completion tokens of all of them. A beam search (use_beam_search) is one
choice whose whole text comes at its end, in one delta.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxlm.config_fields import ConfigError
from jaxlm.generate.text import TextStream
from jaxlm.serve import api
from jaxlm.serve.chat import ChatTemplate
from jaxlm.serve.engine import QueueFull
from jaxlm.serve.loop import EngineLoop, Failed
from jaxlm.serve.metrics import CONTENT_TYPE, ServeMetrics

log = logging.getLogger("jaxlm.serve")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_GONE = object()            # a Pending's event: the client disconnected


class EngineFailed(Exception):
    """The engine failed while this request was in flight."""


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class Server:
    """The app's state: the engine loop, the tokenizer, the chat template, the metrics."""

    def __init__(self, engine, tokenizer, model_name: str = "jaxlm",
                 chat_template: ChatTemplate | None = None):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.chat_template = chat_template or ChatTemplate()
        self.max_len = engine.max_len
        # the most tokens one request may reach: the context, or every KV page of the pool
        self.max_request_len = min(engine.max_len,
                                   (engine.pool.num_blocks - 1) * engine.cfg.page_size)
        self.metrics = ServeMetrics(lambda: self.loop.snapshot)
        self.loop = EngineLoop(engine, self.metrics)
        self.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if not self.loop.alive:
            self.loop.start()
        yield
        await asyncio.to_thread(self.loop.shutdown)

    def check_model(self, req: api.GenerationRequest):
        if req.model is not None and req.model != self.model_name:
            raise api.bad(f"model={req.model!r}: this server serves {self.model_name!r} only",
                          "model", code="model_not_found")

    # ---------------------------------------------------------------- the two endpoints

    async def completions(self, req: api.CompletionRequest, request: Request):
        arrived = time.monotonic()
        self.check_model(req)
        api.check_supported(req)
        prompt = api.completion_prompt(req, self.tokenizer)
        max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        sampling = api.sampling_of(req, max_tokens)
        return await self.serve(request, req, prompt, sampling, arrived, chat=False,
                                beams=api.beams_of(req))

    async def chat_completions(self, req: api.ChatRequest, request: Request):
        arrived = time.monotonic()
        self.check_model(req)
        api.check_supported(req)
        messages = api.chat_messages(req)
        try:
            text = self.chat_template.render(messages)
        except ConfigError as e:
            raise api.bad(str(e), "messages") from None
        prompt = [int(t) for t in self.tokenizer.encode(text)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        if max_tokens is None:  # OpenAI's default: as long as the context allows
            max_tokens = max(1, self.max_request_len - len(prompt))
        sampling = api.sampling_of(req, max_tokens)
        return await self.serve(request, req, prompt, sampling, arrived, chat=True)

    async def serve(self, request: Request, req, prompt: list[int], sampling, arrived: float,
                    chat: bool, beams=None):
        pending = Pending(self, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                          len(prompt), sampling.stop, api.choices_of(req))
        await pending.start(prompt, sampling, arrived, beams)
        watcher = asyncio.create_task(pending.watch(request))
        shape = _Shape(pending.id, self.model_name, chat)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(pending, watcher, shape, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = [[] for _ in pending.choices]
        try:
            async for index, piece, _ in pending.pieces():
                pieces[index].append(piece)
        except EngineFailed as e:
            raise api.ApiError(500, str(e), type="server_error", code="engine_error") from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            watcher.cancel()
            pending.close()
        return JSONResponse(shape.whole(
            [("".join(p), c.finish_reason) for p, c in zip(pieces, pending.choices)],
            pending.usage()))

    async def _events(self, pending: "Pending", watcher, shape: "_Shape", include_usage: bool):
        """The SSE body: chunks as text becomes safe, a finish chunk, [DONE]. An engine failure
        mid-stream is an error event (the status line has already gone out)."""
        try:
            if shape.chat:
                for index in range(len(pending.choices)):
                    yield api.sse(shape.chunk({"role": "assistant", "content": ""}, None, index))
            async for index, piece, reason in pending.pieces():
                if piece:
                    yield api.sse(shape.chunk(piece, None, index))
                if reason:
                    yield api.sse(shape.chunk("", reason, index))
            if include_usage:
                yield api.sse(api.usage_chunk(shape.id, shape.created, shape.model,
                                              shape.chunk_object, pending.usage()))
            yield api.sse("[DONE]")
        except EngineFailed as e:
            yield api.sse(api.error_body(str(e), "server_error", code="engine_error"))
        except ClientGone:
            pass
        finally:
            watcher.cancel()
            pending.close()


class _Shape:
    """One response's id, model and endpoint: what every chunk and the whole answer carry."""

    def __init__(self, id: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = id, model, chat, int(time.time())
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, piece, finish_reason, index: int = 0):
        """One stream chunk of choice `index`."""
        if self.chat:  # the finish chunk carries an empty delta
            delta = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
            return api.chat_chunk(self.id, self.created, self.model, delta, finish_reason,
                                  index)
        return api.completion(self.id, self.created, self.model, [(piece, finish_reason)],
                              chunk=True, first_index=index)

    def whole(self, choices, used):
        """The whole answer; choices: (text, finish_reason) by index."""
        make = api.chat if self.chat else api.completion
        return make(self.id, self.created, self.model, choices, used)


class _Choice:
    """One choice of a request: its text so far and how it ended."""

    def __init__(self, tokenizer, stops):
        self.text = TextStream(tokenizer, stops)
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set once the client has seen its end
        self.running = True                    # the engine still computes it


class Pending:
    """One request in flight, on the event loop's side."""

    def __init__(self, server: Server, request_id: str, prompt_tokens: int, stops, n: int = 1):
        self.server, self.id = server, request_id
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(server.tokenizer, stops) for _ in range(n)]
        self.prompt_tokens = prompt_tokens
        self.ended = False  # the engine owes it nothing more (finished, failed or dropped)
        self._event_loop = asyncio.get_running_loop()

    def _deliver(self, event):
        """Called on the engine thread."""
        try:
            self._event_loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    async def start(self, prompt: list[int], sampling, arrived: float, beams=None):
        """Hand the request to the engine; its refusal is a 400 (bad input) or 429 (busy)."""
        future = self.server.loop.add(self.id, prompt, sampling, self._deliver, arrived,
                                      len(self.choices), beams)
        try:
            await asyncio.wrap_future(future)
        except QueueFull as e:
            self.ended = True
            raise api.ApiError(429, f"the server is busy ({e}): retry later", type="requests",
                               code="rate_limit_exceeded") from None
        except ConfigError as e:
            self.ended = True
            message = str(e)
            if message.startswith("beams="):  # the engine's word for the API's best_of
                message = "best_of=" + message[len("beams="):]
            param = "n" if message.startswith("n=") else "best_of" if message.startswith(
                "best_of=") else "prompt" if "prompt" in message else None
            raise api.bad(message, param) from None
        except asyncio.CancelledError:  # the add may have landed all the same
            self.ended = True
            self.server.loop.abort(self.id)
            raise

    async def watch(self, request: Request):
        """Wait for the client to go away; then drop the request at once."""
        with contextlib.suppress(Exception):
            while (await request.receive())["type"] != "http.disconnect":
                pass
        if not self.ended:
            self.close()
            self.events.put_nowait(_GONE)

    async def pieces(self):
        """(choice index, new text, finish_reason or None) as the engine's tokens come; each
        choice's last one has a finish_reason ("stop" also when a stop string cut the text),
        and the iteration ends once every choice has had its last."""
        metrics, unfinished = self.server.metrics, len(self.choices)
        while True:
            event = await self.events.get()
            if event is _GONE:
                raise ClientGone()
            if isinstance(event, Failed):
                self.ended = True
                metrics.failed.inc()
                raise EngineFailed(event.message)
            choice = self.choices[event.index]
            if event.finish_reason:
                choice.running = False
            if choice.finish_reason:  # cut by a stop string: what follows is not shown
                continue
            choice.completion_tokens += len(event.token_ids)
            piece, reason = choice.text.push(event.token_ids), None
            if choice.text.stopped:
                reason = "stop"
            elif event.finish_reason:
                reason = event.finish_reason
                piece += choice.text.finish()
            if reason:
                choice.finish_reason, unfinished = reason, unfinished - 1
                metrics.finished.labels(reason).inc()
                if not unfinished:
                    self.ended = True
                    if any(c.running for c in self.choices):  # free the engine's pages now
                        self.server.loop.abort(self.id)
                yield event.index, piece, reason
                if not unfinished:
                    return
            elif piece:
                yield event.index, piece, None

    def close(self):
        """The request is over for the client: if the engine still runs it, drop it."""
        if not self.ended:
            self.ended = True
            self.server.loop.abort(self.id)
            self.server.metrics.aborted.inc()

    def usage(self) -> dict:
        return api.usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))


def build_app(engine, tokenizer, model_name: str = "jaxlm",
              chat_template: ChatTemplate | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (a ServingEngine it takes over: from now on only the
    app's engine thread may call it). `app.state.server` holds the Server."""
    server = Server(engine, tokenizer, model_name, chat_template)
    app = FastAPI(title="jaxlm", lifespan=server.lifespan)
    app.state.server = server

    @app.exception_handler(api.ApiError)
    async def api_error(request, e: api.ApiError):
        if e.status in (400, 429):
            server.metrics.rejected.labels("queue_full" if e.status == 429 else "invalid").inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        return await api_error(request, api.describe_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(api.error_body(str(e.detail), "invalid_request_error"),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(api.error_body(f"internal server error ({type(e).__name__}: {e})",
                                           "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse(api.error_body("the engine thread is not running",
                                               "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "jaxlm", "max_model_len": server.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, request: Request):
        return await server.chat_completions(body, request)

    return app
