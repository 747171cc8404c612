"""The per-request series without locks must expose exactly what prometheus_client's own metrics would."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import GC_YOUNG_THRESHOLD, settle_heap
from proxy.metrics import LATENCY_BUCKETS, REQUESTS, LoopCounter, LoopHistogram, Metrics, Series

VALUES = [0.0, 0.0004, 0.001, 0.0010001, 0.3, 1, 2.5, 119.9, 120, 121, 1e6]


def samples(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                  for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created"))


def test_loop_histogram_exposes_what_prometheus_clients_histogram_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    series = Series("t_seconds", "t", ("arm",))
    loop = LoopHistogram(series, LATENCY_BUCKETS)
    ours.register(loop)  # type: ignore[arg-type]
    native = Histogram(series.name, series.help, series.labels, buckets=LATENCY_BUCKETS, registry=theirs)
    for arm in ("treatment", "control"):
        for value in VALUES:
            loop.observe((arm,), value)
            native.labels(arm).observe(value)
    assert samples(ours) == samples(theirs)


def test_loop_counter_exposes_what_prometheus_clients_counter_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopCounter(REQUESTS)
    ours.register(loop)  # type: ignore[arg-type]
    native = Counter(REQUESTS.name, REQUESTS.help, REQUESTS.labels, registry=theirs)
    for labels, amount in ((("none", "true", "", "chat"), 1), (("none", "false", "disabled", "messages"), 3),
                           (("none", "true", "", "chat"), 2)):
        loop.inc(labels, amount)
        native.labels(*labels).inc(amount)
    assert samples(ours) == samples(theirs)


@pytest.mark.parametrize("multiprocess", [False, True])
def test_both_request_metric_kinds_count_the_same(multiprocess: bool, tmp_path: object,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if multiprocess:  # --workers: prometheus_client's metrics, which write the shared files
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        # prometheus_client picks its value class at import; a worker process imports it with the variable set.
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    else:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    assert metrics.multiprocess is multiprocess
    metrics.observe_request("treatment", True, "", 0.02, 0.01, {"prompt_tokens": 7, "completion_tokens": 0})
    metrics.observe_request("treatment", True, "", 0.03, 0.01, {"prompt_tokens": True})
    metrics.observe_request("treatment", True, "", 0.03, 0.01, {"input_tokens": 4, "output_tokens": 5},
                            route="messages")
    metrics.cache_event("hit")
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples_of(metrics)}
    assert found[("bpo_requests_total", (("applied", "true"), ("arm", "treatment"), ("reason", ""),
                                         ("route", "chat")))] == 2
    assert found[("bpo_requests_total", (("applied", "true"), ("arm", "treatment"), ("reason", ""),
                                         ("route", "messages")))] == 1
    assert found[("bpo_request_seconds_count", (("arm", "treatment"), ("route", "chat")))] == 2
    # Anthropic's and the Responses API's input_tokens/output_tokens count as prompt/completion tokens.
    assert found[("bpo_upstream_tokens_total", (("arm", "treatment"), ("kind", "prompt")))] == 12
    assert found[("bpo_upstream_tokens_total", (("arm", "treatment"), ("kind", "completion")))] == 5
    assert found[("bpo_cache_events_total", (("result", "hit"),))] == 1


def samples_of(metrics: Metrics) -> list[object]:
    text = metrics.exposition().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_settle_heap_freezes_start_up_and_widens_the_young_generation() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (max(before[0], GC_YOUNG_THRESHOLD), before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
