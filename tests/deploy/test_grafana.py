"""The Grafana dashboard queries only metrics and labels the code defines, and covers the interface's."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import METRIC_NAMES, LoopCounter, LoopHistogram, Metrics
from tests.deploy.artifacts import dashboard, dashboard_expressions, dashboard_panels, selectors

# interface.md's metrics, plus token usage per arm: what the issue asks the dashboard to show.
REQUIRED = {"bpo_requests_total", "bpo_request_seconds", "bpo_upstream_seconds", "bpo_optimizer_seconds",
            "bpo_optimizer_batch_size", "bpo_cache_events_total", "bpo_feedback_total", "bpo_upstream_tokens_total"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Labels Prometheus adds at scrape time.
TARGET_LABELS = {"job", "instance"}


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) of every collector the app registers.

    prometheus_client keeps label names private; reading them beats copying a list that could drift.
    """
    found = {}
    metrics = Metrics()
    for collector in [*vars(metrics).values(), *vars(metrics.per_request).values()]:
        if isinstance(collector, MetricWrapperBase):
            name = collector._name + ("_total" if collector._type == "counter" else "")
            found[name] = (str(collector._type), tuple(collector._labelnames))
        elif isinstance(collector, LoopCounter | LoopHistogram):  # the lock-free per-request series
            kind = "counter" if isinstance(collector, LoopCounter) else "histogram"
            found[collector.series.name] = (kind, collector.series.labels)
    return found


def test_exported_metrics_are_the_declared_names() -> None:
    assert set(exported_metrics()) == set(METRIC_NAMES)


def _series_metric(series: str, exported: dict[str, tuple[str, tuple[str, ...]]]) -> tuple[str, bool]:
    """The metric behind a series name, and whether it is a histogram's bucket series."""
    if series in exported:
        return series, False
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if series.endswith(suffix) and exported.get(base, ("",))[0] == "histogram":
            return base, suffix == "_bucket"
    raise AssertionError(f"the dashboard queries {series}, which the code does not export")


def test_every_query_uses_exported_metrics_and_their_labels() -> None:
    exported = exported_metrics()
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    for expression in expressions:
        found = selectors(expression)
        assert found, f"no bpo metric in {expression}"
        for selector in found:
            metric, bucket = _series_metric(selector.metric, exported)
            allowed = set(exported[metric][1]) | TARGET_LABELS | ({"le"} if bucket else set())
            used = {label for label, _, _ in selector.matchers} | set(selector.grouping)
            assert used <= allowed, f"{expression}: {metric} has no label {used - allowed}"


def test_histogram_quantiles_aggregate_by_le() -> None:
    for expression in dashboard_expressions():
        if "histogram_quantile" in expression:
            assert all(s.metric.endswith("_bucket") and "le" in s.grouping for s in selectors(expression))


def test_dashboard_covers_the_interface_metrics() -> None:
    queried = {_series_metric(s.metric, exported_metrics())[0]
               for e in dashboard_expressions() for s in selectors(e)}
    assert queried >= REQUIRED, f"not on the dashboard: {REQUIRED - queried}"


def test_every_panel_reads_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "bpo_requests_total" in variables["job"]["definition"]
    for panel in dashboard_panels():
        if panel["type"] != "row":
            targets = panel["targets"]
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" and '$job' in t["expr"] for t in targets)


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        assert panel.get("title")
    assert dashboard()["uid"] == "bpo-proxy"
