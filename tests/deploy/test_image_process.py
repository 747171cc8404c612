"""The image's own process, run here: its ENV and CMD start the real server, its HEALTHCHECK sees it come up,
and the label values the dashboard filters on appear in the live /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.artifacts import (
    ROOT,
    console_script,
    dashboard_expressions,
    healthcheck_command,
    image_command,
    selectors,
    stages,
)
from tests.fakes.upstream import FakeUpstream, free_port

# The image's own command, as a process.
pytestmark = pytest.mark.slow

STARTUP_SECONDS = 90  # a busy CI machine takes its time importing the gateway


def _environment(port: int, upstream: FakeUpstream) -> dict[str, str]:
    image_env = {k: v for k, v in stages("Dockerfile")[-1].env().items() if k != "PATH"}
    upstream_root = upstream.base_url.removesuffix("/v1")
    return {**{k: v for k, v in os.environ.items() if not k.startswith("BPO_")}, **image_env,
            # Loopback instead of the container's 0.0.0.0; the fake provider as upstream and optimizer.
            "BPO_HOST": "127.0.0.1", "BPO_PORT": str(port), "BPO_UPSTREAM_BASE_URL": upstream.base_url,
            "BPO_OPTIMIZER": f"remote:{upstream_root}", "BPO_OPTIMIZER_MODEL": "bpo-fake", "BPO_CACHE": "memory"}


def _healthcheck(env: dict[str, str]) -> int:
    command = healthcheck_command("Dockerfile")
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10,
                          check=False).returncode


@pytest.fixture
def image_process(upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    env = _environment(port, upstream)
    assert _healthcheck(env) != 0, "the health check must fail while nothing listens"
    # `bpo` resolved through pyproject's console script, so the test needs no installed launcher.
    command = console_script(image_command("Dockerfile")[0]) + image_command("Dockerfile")[1:]
    log = (tmp_path / "bpo.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while _healthcheck(env) != 0:
            assert process.poll() is None, (tmp_path / "bpo.log").read_text()
            assert time.monotonic() < deadline, "the image's HEALTHCHECK never passed"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", env
    finally:
        process.terminate()
        process.wait(timeout=40)
        log.close()


def _wait_ready(client: httpx.Client) -> dict[str, object]:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        response = client.get("/readyz")
        if response.status_code == 200 and response.json()["optimizer"]["state"] == "ready":
            return dict(response.json())
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


def _chat(client: httpx.Client, text: str, **headers: str) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _samples(text: str) -> list[tuple[str, dict[str, str]]]:
    return [(sample.name, sample.labels) for family in text_string_to_metric_families(text)
            for sample in family.samples]


def _matcher_holds(actual: str, op: str, value: str) -> bool:
    """PromQL label matching: regexes are anchored at both ends."""
    if op in ("=~", "!~"):
        return (re.fullmatch(value, actual) is not None) == (op == "=~")
    return (actual == value) == (op == "=")


def _matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    # job is added by Prometheus at scrape time; the dashboard's $job is a template variable.
    return all(_matcher_holds(labels.get(label, ""), op, value) for label, op, value in matchers if label != "job")


def test_image_command_serves_and_the_dashboard_filters_match_live_series(
        image_process: tuple[str, dict[str, str]]) -> None:
    base_url, _ = image_process
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        assert _wait_ready(client)["status"] == "ready"
        first = _chat(client, "Write a short poem about the sea")
        again = _chat(client, "Write a short poem about the sea")
        _chat(client, "Write a short poem about the sea", **{"X-BPO": "off"})
        assert (first.headers["X-BPO-Applied"], first.headers["X-BPO-Cache"]) == ("true", "miss")
        assert again.headers["X-BPO-Cache"] == "hit"
        feedback = {"request_id": first.headers["X-Request-Id"], "score": 1}
        assert client.post("/v1/bpo/feedback", json=feedback).status_code < 300
        exposition = client.get("/metrics").text
    samples = _samples(exposition)
    exercised = {name for name, _ in samples}
    checked = 0
    for expression in dashboard_expressions():
        for selector in selectors(expression):
            if selector.metric not in exercised:
                continue  # e.g. batch size (hf: only) and shadow verdicts, which this run does not produce
            assert any(name == selector.metric and _matches(labels, selector.matchers) for name, labels in samples), \
                f"no live series matches {selector.metric}{selector.matchers} in {expression}"
            checked += 1
    assert checked >= 20
    assert {"bpo_requests_total", "bpo_cache_events_total", "bpo_feedback_total",
            "bpo_optimizer_seconds_bucket", "bpo_upstream_tokens_total"} <= exercised
