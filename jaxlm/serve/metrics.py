"""/metrics for the server, in Prometheus' text format.

Each app gets its own CollectorRegistry (never the process-wide default), so a process can hold
several servers (tests do) without metric names clashing. Engine-side numbers (queue, pages,
prefix hits, token counts) are read at scrape time from the engine thread's latest stats
snapshot, never from the engine itself (it is not thread-safe); latencies are observed by the
engine thread as it hands tokens out; request outcomes are counted by the HTTP side.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# stats() key -> (metric name, help) for the gauges and counters read from the snapshot
GAUGES = {
    "waiting": ("jaxlm_requests_waiting", "Requests queued for the engine"),
    "running": ("jaxlm_requests_running", "Requests the engine is computing"),
    "pages_used": ("jaxlm_kv_pages_used", "KV cache pages held by running requests"),
    "pages_total": ("jaxlm_kv_pages_total", "KV cache pages in the pool"),
    "pages_cached": ("jaxlm_kv_pages_cached", "Free KV pages still holding a cached prefix"),
    "pool_usage": ("jaxlm_kv_pool_usage", "Fraction of KV pages in use"),
    "kv_waste": ("jaxlm_kv_waste", "Fraction of held KV slots not (yet) filled"),
    "prefix_hit_rate": ("jaxlm_prefix_hit_rate", "Prefix-cache page hits per page looked up"),
}
COUNTERS = {
    "generated_tokens": ("jaxlm_generated_tokens", "Tokens sampled by the engine"),
    "computed_tokens": ("jaxlm_computed_tokens", "Tokens run through the model (prefill too)"),
    "steps": ("jaxlm_engine_steps", "Engine steps"),
    "preempted": ("jaxlm_preemptions", "Requests preempted (recomputed later) for KV pages"),
}


class ServeMetrics:
    """What the engine thread and the HTTP side record; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], dict], window_s: float = 10.0):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds",
                              "From the request's arrival to its first output",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxlm_inter_token_latency_seconds",
                             "Between consecutive output tokens of one request",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.finished = Counter("jaxlm_requests_finished", "Requests answered to their end",
                                ["finish_reason"], registry=self.registry)
        self.aborted = Counter("jaxlm_requests_aborted",
                               "Requests dropped before their end (the client went away)",
                               registry=self.registry)
        self.failed = Counter("jaxlm_requests_failed", "Requests ended by an engine error",
                              registry=self.registry)
        self.rejected = Counter("jaxlm_requests_rejected", "Requests refused at the door",
                                ["reason"], registry=self.registry)
        self.window_s = window_s
        self._started = time.monotonic()
        self._recent: collections.deque = collections.deque()  # (time, tokens) per step
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(stats, self))

    # the engine thread's hooks (jaxlm.serve.loop)
    def first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float):
        self.itl.observe(seconds)

    def generated(self, now: float, tokens: int):
        with self._lock:
            if tokens:
                self._recent.append((now, tokens))
            self._forget(now)

    def _forget(self, now: float):
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window_s` (or since the start)."""
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            tokens = sum(n for _, n in self._recent)
        return tokens / max(min(self.window_s, now - self._started), 1e-3)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, stats, metrics: ServeMetrics):
        self.stats, self.metrics = stats, metrics

    def collect(self):
        snapshot = self.stats()
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=float(snapshot.get(key, 0)))
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(snapshot.get(key, 0)))
        yield GaugeMetricFamily("jaxlm_generation_tokens_per_second",
                                f"Generated tokens per second over the last "
                                f"{self.metrics.window_s:g} s",
                                value=self.metrics.tokens_per_second())
