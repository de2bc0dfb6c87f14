"""The serving engine's own thread.

ServingEngine is not thread-safe, and a step holds the device for milliseconds to seconds, so
it cannot run on the server's event loop: exactly one thread owns it. Everything else talks to
that thread through one command queue (add, abort, call), and the thread hands each request's
results back to whoever asked through that request's `deliver` callable (the server's wraps
`loop.call_soon_threadsafe`). Between steps the thread drains every queued command, so an
abort frees its pages before the next step; with nothing to do it blocks on the queue.
A request of n choices (parallel sampling) is one request here: its deliveries are the deltas
of all its choices (each names its choice by `index`), and it is done once every choice has
finished.

A step that raises fails every request in flight (each gets a `Failed` event, the engine drops
them so their pages come back) and the thread goes on serving: one bad step never takes the
server down.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger("jaxlm.serve")


@dataclasses.dataclass
class Failed:
    """The end of a request the engine could not finish (the client gets a server error)."""
    message: str


@dataclasses.dataclass
class _Track:
    deliver: Callable[[Any], None]  # takes a Delta or a Failed; must not block
    arrived: float                  # time.monotonic() when the server got the request
    choices: int = 1                # choices not yet finished
    last: dict = dataclasses.field(default_factory=dict)  # choice -> when its last delta came


class _NoMetrics:
    def first_token(self, seconds):
        pass

    def inter_token(self, seconds):
        pass

    def generated(self, now, tokens):
        pass


_STOP = object()


class EngineLoop:
    """Owns a ServingEngine on one background thread; every method here is safe from any
    thread. `snapshot` is the engine's latest stats() (refreshed after each step or command),
    so readers never touch the engine itself."""

    def __init__(self, engine, metrics=None):
        self.engine = engine
        self.metrics = metrics or _NoMetrics()
        self.snapshot: dict = engine.stats()
        self.step_failures = 0
        self._commands: queue.Queue = queue.Queue()
        self._tracks: dict[str, _Track] = {}
        self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)

    # ---------------------------------------------------------------- any thread

    def start(self):
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued_commands(self) -> int:
        """Commands not yet taken by the engine thread (tests wait on this)."""
        return self._commands.qsize()

    def add(self, request_id: str, prompt_ids, sampling, deliver, arrived: float, n: int = 1,
            beams=None) -> concurrent.futures.Future:
        """Queue a request of n choices (or, with `beams` (a BeamConfig), one beam search: a
        single delta at its end). The future resolves to None once the engine took it,
        or to the engine's exception (ConfigError, QueueFull); cancelling it first skips the
        add."""
        future = concurrent.futures.Future()
        self._commands.put(("add", request_id, prompt_ids, sampling,
                            _Track(deliver, arrived, n), beams, future))
        return future

    def abort(self, request_id: str):
        """Drop the request (no more deliveries; its pages are freed before the next step)."""
        self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between steps; its result in the future."""
        future = concurrent.futures.Future()
        self._commands.put(("call", fn, future))
        return future

    def shutdown(self, timeout: float = 30.0):
        """Stop after the current step; requests still in flight get a Failed event."""
        if self._thread.is_alive():
            self._commands.put((_STOP,))
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the engine thread

    def _run(self):
        while True:
            try:
                command = self._commands.get(block=not self.engine.has_work)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] is _STOP:
                    self._fail_all("the server is shutting down")
                    return
                try:
                    self._do(command)
                except Exception:  # noqa: BLE001 (a bad command must not end the thread)
                    log.exception("engine command %s failed", command[0])
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_work:
                self._step()
            try:
                self.snapshot = self.engine.stats()
            except Exception:  # noqa: BLE001 (metrics go stale rather than the server down)
                log.exception("engine stats failed")

    def _do(self, command):
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, sampling, track, beams, future = command
            if not future.set_running_or_notify_cancel():
                return  # the asker gave up before the engine got to it
            try:
                self.engine.add(request_id, prompt_ids, sampling, n=track.choices, beams=beams)
            except Exception as e:  # noqa: BLE001 (ConfigError, QueueFull: the asker's to report)
                future.set_exception(e)
                return
            self._tracks[request_id] = track
            future.set_result(None)
        elif kind == "abort":
            if self._tracks.pop(command[1], None) is not None:
                self.engine.abort(command[1])
        elif kind == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(e)

    def _step(self):
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 (the server must outlive a bad step)
            self.step_failures += 1
            log.exception("engine step failed; failing the %d requests in flight",
                          len(self._tracks))
            self._fail_all(f"the engine failed while serving this request "
                           f"({type(e).__name__}: {e})")
            return
        now, generated = time.monotonic(), 0
        for delta in deltas:
            track = self._tracks.get(delta.request_id)
            if track is None:
                continue
            if not track.last:  # the request's first output, of any choice
                self.metrics.first_token(now - track.arrived)
            elif delta.token_ids and delta.index in track.last:
                self.metrics.inter_token(now - track.last[delta.index])
            track.last[delta.index] = now
            generated += len(delta.token_ids)
            if delta.finish_reason:
                track.choices -= 1
                if not track.choices:
                    del self._tracks[delta.request_id]
            track.deliver(delta)
        self.metrics.generated(now, generated)

    def _fail_all(self, message: str):
        """Every request in flight ends with `message`; the engine lets go of them."""
        tracks, self._tracks = self._tracks, {}
        for request_id, track in tracks.items():
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 (keep failing the others)
                log.exception("could not drop request %s from the engine", request_id)
            track.deliver(Failed(message))
