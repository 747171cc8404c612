"""A client that leaves stops its request's work: the upstream call is closed, an unsent request never goes."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, chat_reply, completion_reply

from .conftest import StartProxy

PATIENCE = 60.0  # generous: the machine may be busy; every wait ends as soon as its condition holds
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "Tell me about llamas"}]}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def send_and_leave(proxy: RunningProxy, body: dict[str, Any], x_bpo: str, until: Callable[[], bool],
                   what: str) -> None:
    """POST a chat completion on a raw connection, and close it once ``until`` holds."""
    raw = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-BPO: {x_bpo}\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE) as connection:
        connection.sendall(head + raw)
        wait_until(until, what)


def metric(proxy: RunningProxy, name: str, label: str, value: str) -> float:
    metrics = httpx.get(proxy.url + "/metrics", timeout=PATIENCE).text
    found = re.search(rf'^{name}{{{label}="{value}"}} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def disconnects(proxy: RunningProxy, stage: str) -> float:
    return metric(proxy, "bpo_client_disconnects_total", "stage", stage)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_closes_the_upstream_call(upstream: FakeUpstream, start_proxy: StartProxy,
                                                       tmp_path: Path, stream: bool) -> None:
    upstream.responders["/v1/chat/completions"] = lambda recorded: replace(chat_reply(recorded.json),
                                                                           delay=PATIENCE * 2)
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(upstream_timeout=PATIENCE * 3, events=f"jsonl:{events}")
    send_and_leave(proxy, {**BODY, "stream": stream}, "off",
                   lambda: len(upstream.requests_to("/v1/chat/completions")) == 1, "the request reached the upstream")
    wait_until(lambda: upstream.abandoned == 1, "the upstream saw its connection closed")
    wait_until(lambda: disconnects(proxy, "upstream") == 1, "the disconnect was counted")
    proxy.stop()  # the events sink flushes on close
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert (event["type"], event["status"]) == ("request", 499)


def test_a_client_that_leaves_during_the_rewrite_is_never_sent_upstream(upstream: FakeUpstream,
                                                                        start_proxy: StartProxy) -> None:
    upstream.responders["/v1/completions"] = lambda recorded: replace(completion_reply(recorded.json),
                                                                      delay=PATIENCE * 2)
    proxy = start_proxy(optimizer_timeout=PATIENCE * 3)
    send_and_leave(proxy, BODY, "on", lambda: len(upstream.requests_to("/v1/completions")) == 1,
                   "the prompt reached the optimizer")
    wait_until(lambda: disconnects(proxy, "optimizer") == 1, "the disconnect was counted")
    # Nobody else waited for that rewrite: its computation stopped too (docs/cache.md, single-flight).
    wait_until(lambda: upstream.abandoned == 1, "the optimizer saw its connection closed")
    assert upstream.requests_to("/v1/chat/completions") == []


def test_a_rewrite_another_request_waits_for_goes_on(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    slow = 5.0
    upstream.responders["/v1/completions"] = lambda recorded: replace(completion_reply(recorded.json), delay=slow)
    proxy = start_proxy(optimizer_timeout=PATIENCE)
    with httpx.Client(timeout=PATIENCE) as http, ThreadPoolExecutor(1) as pool:
        staying = pool.submit(http.post, proxy.base_url + "/chat/completions", json=BODY, headers={"x-bpo": "on"})
        wait_until(lambda: len(upstream.requests_to("/v1/completions")) == 1, "the prompt reached the optimizer")
        send_and_leave(proxy, BODY, "on", lambda: metric(proxy, "bpo_cache_events_total", "result", "hit") == 1,
                       "the second request joined the first one's rewrite")  # coalesced: counted as a hit
        wait_until(lambda: disconnects(proxy, "optimizer") == 1, "the disconnect was counted")
        response = staying.result(timeout=PATIENCE)
    assert response.status_code == 200 and response.headers["x-bpo-applied"] == "true"
    assert len(upstream.requests_to("/v1/completions")) == 1 and upstream.abandoned == 0
    assert len(upstream.requests_to("/v1/chat/completions")) == 1  # the one that stayed
