"""Prometheus metrics for the server (`prometheus_client`, one registry per app so several apps can
live in one process): requests by prefix and outcome, rejections, cancellations, queue depth,
running rows, computed tokens, time to first token and time per output token."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from .interface import Engine
from .store import PrefixStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCounters:
    """Counters the engine keeps itself (read at scrape time)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        computed = CounterMetricFamily(
            "prefixtune_computed_tokens", "Tokens the engine computed (including for requests cancelled meanwhile)"
        )
        computed.add_metric([], self.engine.stats().computed_tokens)
        yield computed


class Metrics:
    def __init__(self, engine: Engine, store: PrefixStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixtune_requests", "Finished requests by prefix and outcome", ["prefix", "outcome"], registry=r
        )
        self.rejections = Counter("prefixtune_rejections", "Requests refused by --max-queue", registry=r)
        self.cancellations = Counter(
            "prefixtune_cancellations", "Requests removed before their end", ["reason"], registry=r
        )
        self.output_tokens = Counter("prefixtune_output_tokens", "Tokens returned to clients", registry=r)
        self.ttft = Histogram(
            "prefixtune_time_to_first_token_seconds", "Admission to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "prefixtune_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Gauge("prefixtune_queue_depth", "Requests waiting for a row", registry=r).set_function(
            lambda: engine.stats().queue_depth
        )
        Gauge("prefixtune_running_rows", "Requests in the running batch", registry=r).set_function(
            lambda: engine.stats().running_rows
        )
        Gauge("prefixtune_prefixes_loaded", "Prefixes held in memory", registry=r).set_function(
            lambda: len(store.loaded)
        )
        Gauge("prefixtune_prefix_cache_bytes", "Bytes of prefix keys/values held", registry=r).set_function(
            lambda: store.loaded_bytes
        )
        r.register(_EngineCounters(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
