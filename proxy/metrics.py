"""Prometheus metrics of the gateway, on a registry the app owns."""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Every metric name this gateway exports (interface.md); deploy/ dashboards are checked against it.
METRIC_NAMES = (
    "bpo_requests_total",
    "bpo_request_seconds",
    "bpo_upstream_seconds",
    "bpo_optimizer_seconds",
    "bpo_optimizer_batch_size",
    "bpo_cache_events_total",
    "bpo_feedback_total",
    "bpo_upstream_tokens_total",
    "bpo_fail_open_total",
    "bpo_client_disconnects_total",
    "bpo_upstream_stream_errors_total",
    "bpo_shadow_verdicts_total",
    "bpo_shadow_skipped_total",
    "bpo_client_requests_total",
    "bpo_key_spend_usd_total",
)


def use_multiprocess_dir(environ: MutableMapping[str, str]) -> str:
    """Give worker processes one PROMETHEUS_MULTIPROC_DIR (prometheus_client's own convention), set before
    they import it: each worker's samples go to files there and /metrics on any worker merges them all."""
    if not environ.get("PROMETHEUS_MULTIPROC_DIR"):
        environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bpo-metrics-")
    return environ["PROMETHEUS_MULTIPROC_DIR"]


class Series(NamedTuple):
    name: str
    help: str
    labels: tuple[str, ...]


# usage fields by kind: OpenAI chat's name, then the Responses and Anthropic name.
TOKEN_FIELDS = (("prompt", "prompt_tokens", "input_tokens"), ("completion", "completion_tokens", "output_tokens"))

# The series updated on every request.
# ``route``: chat, responses or messages (the request shapes of proxy/shapes.py: bounded).
REQUESTS = Series("bpo_requests_total", "Requests served on the rewriting routes",
                  ("arm", "applied", "reason", "route"))
REQUEST_SECONDS = Series("bpo_request_seconds", "End-to-end time of a request on a rewriting route",
                         ("arm", "route"))
UPSTREAM_SECONDS = Series("bpo_upstream_seconds", "Time until the upstream's response headers", ("arm",))
UPSTREAM_TOKENS = Series("bpo_upstream_tokens_total", "Tokens the upstream reported in usage", ("arm", "kind"))
CACHE_EVENTS = Series("bpo_cache_events_total", "Rewrite cache lookups", ("result",))
CLIENT_REQUESTS = Series("bpo_client_requests_total", "Client-key checks by outcome", ("key_name", "outcome"))
KEY_SPEND = Series("bpo_key_spend_usd_total", "USD charged to client keys", ("key_name",))


def _native_counter(series: Series, registry: CollectorRegistry) -> Counter:
    return Counter(series.name, series.help, series.labels, registry=registry)


def _native_histogram(series: Series, registry: CollectorRegistry, buckets: Sequence[float]) -> Histogram:
    return Histogram(series.name, series.help, series.labels, buckets=buckets, registry=registry)


class LoopCounter:
    """A labelled counter only the event loop's thread updates: a dict of numbers, no lock, no child objects.

    prometheus_client's own metrics take a lock per update; for the few updated on every request that costs
    more than the rest of the bookkeeping (``bench/README.md``). Read on scrape, on the same thread.
    """

    def __init__(self, series: Series) -> None:
        self.series = series
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.series.name, self.series.help, labels=self.series.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        yield family


class LoopHistogram:
    """A labelled histogram only the event loop's thread updates (see ``LoopCounter``)."""

    def __init__(self, series: Series, buckets: Sequence[float]) -> None:
        self.series = series
        self.bounds = tuple(float(b) for b in buckets)
        # Per label values: a count per bucket (not cumulative), then the +Inf bucket's, then the sum.
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.values.get(labels)
        if series is None:
            series = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1  # buckets are "less than or equal"
        series[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.series.name, self.series.help, labels=self.series.labels)
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        for labels, series in self.values.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, series, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(labels, buckets, series[-1])
        yield family


class _LoopRequestMetrics:
    """The per-request series of one process, updated without locks (``LoopCounter``, ``LoopHistogram``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = LoopCounter(REQUESTS)
        self.request_seconds = LoopHistogram(REQUEST_SECONDS, buckets=LATENCY_BUCKETS)
        self.upstream_seconds = LoopHistogram(UPSTREAM_SECONDS, buckets=LATENCY_BUCKETS)
        self.upstream_tokens = LoopCounter(UPSTREAM_TOKENS)
        self.cache_events = LoopCounter(CACHE_EVENTS)
        self.client_requests = LoopCounter(CLIENT_REQUESTS)
        self.key_spend = LoopCounter(KEY_SPEND)
        for collector in (self.requests, self.request_seconds, self.upstream_seconds, self.upstream_tokens,
                          self.cache_events, self.client_requests, self.key_spend):
            registry.register(collector)  # type: ignore[arg-type]  # a Collector by shape

    def observe(self, arm: str, applied: bool, reason: str, seconds: float, upstream_seconds: float,
                usage: Mapping[str, Any] | None, route: str) -> None:
        self.requests.inc((arm, "true" if applied else "false", reason, route))
        self.request_seconds.observe((arm, route), seconds)
        self.upstream_seconds.observe((arm,), upstream_seconds)
        if usage:
            for kind, field, alias in TOKEN_FIELDS:
                tokens = usage.get(field, usage.get(alias))
                if isinstance(tokens, int) and tokens > 0:
                    self.upstream_tokens.inc((arm, kind), tokens)

    def cache_event(self, result: str) -> None:
        self.cache_events.inc((result,))

    def client_request(self, key_name: str, outcome: str) -> None:
        self.client_requests.inc((key_name, outcome))

    def key_spend_usd(self, key_name: str, usd: float) -> None:
        self.key_spend.inc((key_name,), usd)


class _SharedRequestMetrics:
    """The same series as prometheus_client metrics: with ``--workers`` each process's samples go to files
    in PROMETHEUS_MULTIPROC_DIR, merged on scrape, and only its own metric classes write them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = _native_counter(REQUESTS, registry)
        self.request_seconds = _native_histogram(REQUEST_SECONDS, registry, buckets=LATENCY_BUCKETS)
        self.upstream_seconds = _native_histogram(UPSTREAM_SECONDS, registry, buckets=LATENCY_BUCKETS)
        self.upstream_tokens = _native_counter(UPSTREAM_TOKENS, registry)
        self.cache_events = _native_counter(CACHE_EVENTS, registry)
        self.client_requests = _native_counter(CLIENT_REQUESTS, registry)
        self.key_spend = _native_counter(KEY_SPEND, registry)
        # Labelled children, looked up once: labels() takes a lock and checks its arguments on every call.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, arm: str, applied: bool, reason: str, seconds: float, upstream_seconds: float,
                usage: Mapping[str, Any] | None, route: str) -> None:
        self._child(self.requests, arm, "true" if applied else "false", reason, route).inc()
        self._child(self.request_seconds, arm, route).observe(seconds)
        self._child(self.upstream_seconds, arm).observe(upstream_seconds)
        if usage:
            for kind, field, alias in TOKEN_FIELDS:
                tokens = usage.get(field, usage.get(alias))
                if isinstance(tokens, int) and tokens > 0:
                    self._child(self.upstream_tokens, arm, kind).inc(tokens)

    def cache_event(self, result: str) -> None:
        self._child(self.cache_events, result).inc()

    def client_request(self, key_name: str, outcome: str) -> None:
        self._child(self.client_requests, key_name, outcome).inc()

    def key_spend_usd(self, key_name: str, usd: float) -> None:
        self._child(self.key_spend, key_name).inc(usd)


class Metrics:
    """The collectors; one instance per app, so tests and replicas never share state."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.per_request = _SharedRequestMetrics(r) if self.multiprocess else _LoopRequestMetrics(r)
        # Bound once, called on every request of a client key: one client-key check (ok, invalid_key,
        # model_not_allowed, rate_limited, budget_exceeded, ...), and a key's spend in USD.
        self.client_request: Callable[[str, str], None] = self.per_request.client_request
        self.key_spend: Callable[[str, float], None] = self.per_request.key_spend_usd
        self.optimizer_seconds = Histogram("bpo_optimizer_seconds", "Time spent producing one rewrite",
                                           ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.optimizer_batch_size = Histogram("bpo_optimizer_batch_size", "Prompts generated together",
                                              buckets=BATCH_BUCKETS, registry=r)
        self.feedback = Counter("bpo_feedback_total", "Feedback records received", ["arm"], registry=r)
        self.fail_open = Counter("bpo_fail_open_total", "Faults swallowed so the request could go on",
                                 ["component"], registry=r)
        self.upstream_stream_errors = Counter(
            "bpo_upstream_stream_errors_total",
            "Streams the upstream broke off after they began (cut, idle, error); the client got an error event",
            ["reason"], registry=r)
        self.client_disconnects = Counter(
            "bpo_client_disconnects_total",
            "Chat completions whose client left while the optimizer or the upstream worked; both were stopped",
            ["stage"], registry=r)
        self.shadow_verdicts = Counter("bpo_shadow_verdicts_total", "Shadow judge verdicts for treatment",
                                       ["verdict"], registry=r)
        self.shadow_skipped = Counter("bpo_shadow_skipped_total",
                                      "Sampled treatment requests not judged (budget, busy, incomplete, ...)",
                                      ["reason"], registry=r)
        # key_name: names of configured keys only ("" for a request without a valid key), so bounded.

    def observe_request(self, arm: str, applied: bool, reason: str, seconds: float, upstream_seconds: float,
                        usage: Mapping[str, Any] | None, route: str = "chat") -> None:
        """One finished request on a rewriting route: counters, latencies and the upstream's token usage.

        Called on the event loop's thread only (like ``cache_event``).
        """
        self.per_request.observe(arm, applied, reason, seconds, upstream_seconds, usage, route)

    def cache_event(self, result: str) -> None:
        """One rewrite cache lookup: hit, miss, error, ..."""
        self.per_request.cache_event(result)

    def broken_stream(self, reason: str) -> None:
        """A stream the upstream broke off after it began: ``cut``, ``idle`` or ``error`` (in-band)."""
        self.upstream_stream_errors.labels(reason=reason).inc()

    def exposition(self) -> bytes:
        """The text exposition; merges worker processes when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
