"""Prometheus metrics of the gateway, on a registry the app owns."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
    "bpo_shadow_verdicts_total",
    "bpo_shadow_skipped_total",
)


def use_multiprocess_dir(environ: MutableMapping[str, str]) -> str:
    """Give worker processes one PROMETHEUS_MULTIPROC_DIR (prometheus_client's own convention), set before
    they import it: each worker's samples go to files there and /metrics on any worker merges them all."""
    if not environ.get("PROMETHEUS_MULTIPROC_DIR"):
        environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bpo-metrics-")
    return environ["PROMETHEUS_MULTIPROC_DIR"]


class Metrics:
    """The collectors; one instance per app, so tests and replicas never share state."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("bpo_requests_total", "Chat completions served", ["arm", "applied", "reason"],
                                registry=r)
        self.request_seconds = Histogram("bpo_request_seconds", "End-to-end chat completion time", ["arm"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram("bpo_upstream_seconds", "Time until the upstream's response headers",
                                          ["arm"], buckets=LATENCY_BUCKETS, registry=r)
        self.optimizer_seconds = Histogram("bpo_optimizer_seconds", "Time spent producing one rewrite",
                                           ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.optimizer_batch_size = Histogram("bpo_optimizer_batch_size", "Prompts generated together",
                                              buckets=BATCH_BUCKETS, registry=r)
        self.cache_events = Counter("bpo_cache_events_total", "Rewrite cache lookups", ["result"], registry=r)
        self.feedback = Counter("bpo_feedback_total", "Feedback records received", ["arm"], registry=r)
        self.upstream_tokens = Counter("bpo_upstream_tokens_total", "Tokens the upstream reported in usage",
                                       ["arm", "kind"], registry=r)
        self.fail_open = Counter("bpo_fail_open_total", "Faults swallowed so the request could go on",
                                 ["component"], registry=r)
        self.shadow_verdicts = Counter("bpo_shadow_verdicts_total", "Shadow judge verdicts for treatment",
                                       ["verdict"], registry=r)
        self.shadow_skipped = Counter("bpo_shadow_skipped_total",
                                      "Sampled treatment requests not judged (budget, busy, incomplete, ...)",
                                      ["reason"], registry=r)

        # Labelled children, looked up once: labels() takes a lock and builds a key on every call.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, arm: str, applied: bool, reason: str, seconds: float, upstream_seconds: float,
                        usage: Mapping[str, Any] | None) -> None:
        """One finished chat completion: counters, latencies and the upstream's token usage."""
        self._child(self.requests, arm, "true" if applied else "false", reason).inc()
        self._child(self.request_seconds, arm).observe(seconds)
        self._child(self.upstream_seconds, arm).observe(upstream_seconds)
        for kind in ("prompt", "completion"):
            tokens = (usage or {}).get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                self._child(self.upstream_tokens, arm, kind).inc(tokens)

    def exposition(self) -> bytes:
        """The text exposition; merges worker processes when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
