"""Odd but valid JSON never makes a 500: lone surrogate escapes and deep nesting pass, or get a 400."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, Reply, default_rewrite

from .conftest import StartProxy

HEADERS = {"content-type": "application/json", "x-bpo": "on"}


def post(url: str, raw: bytes, **headers: str) -> httpx.Response:
    return httpx.post(url + "/chat/completions", content=raw, headers={**HEADERS, **headers}, timeout=60)


def test_a_lone_surrogate_in_the_prompt_is_rewritten_and_echoed(upstream: FakeUpstream,
                                                               start_proxy: StartProxy) -> None:
    proxy = start_proxy()
    raw = b'{"model":"fake-model","messages":[{"role":"user","content":"Explain \\ud800 escapes"}]}'
    response = post(proxy.base_url, raw, **{"x-bpo-debug": "1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-bpo-applied"] == "true"
    expected = default_rewrite("Explain \ufffd escapes")
    assert unquote(response.headers["x-bpo-optimized-prompt"]) == expected
    assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_in_the_model_is_passed_and_accounted(upstream: FakeUpstream, start_proxy: StartProxy,
                                                               tmp_path: Path, stream: bool) -> None:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(events=f"jsonl:{events}", log_level="info")
    raw = (b'{"model":"fake-\\udc00","stream":' + json.dumps(stream).encode()
           + b',"messages":[{"role":"user","content":"Say hi"}]}')
    response = post(proxy.base_url, raw)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
    assert upstream.requests_to("/v1/chat/completions")[-1].json["model"] == "fake-\udc00"
    metrics = httpx.get(proxy.url + "/metrics", timeout=30).text
    assert 'bpo_requests_total{applied="true",arm="none",reason="",route="chat"} 1.0' in metrics
    proxy.stop()  # the events sink flushes on close
    assert json.loads(events.read_text())["model"] == "fake-\udc00"


def test_a_lone_surrogate_in_user_with_a_split(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(ab_treatment_percent=50)
    raw = b'{"model":"fake-model","user":"\\ud83d","messages":[{"role":"user","content":"Say hi"}]}'
    response = httpx.post(proxy.base_url + "/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-bpo-arm"] in ("treatment", "control")


def nested(depth: int, tail: bytes = b"") -> bytes:
    """A chat completion whose vendor field nests ``depth`` arrays (the body itself is one level more)."""
    return (b'{"model":"fake-model","x":' + b"[" * depth + b"]" * depth + tail
            + b',"messages":[{"role":"user","content":"Say hi"}]}')


@pytest.mark.parametrize("depth", [980, 1000, 1023])
def test_deep_json_is_rewritten_and_passed(upstream: FakeUpstream, start_proxy: StartProxy, depth: int) -> None:
    # The fake answers without reading the body: the standard library's reader could not.
    upstream.responders["/v1/chat/completions"] = lambda recorded: Reply(json={"object": "chat.completion"})
    proxy = start_proxy()
    response = post(proxy.base_url, nested(depth))
    assert response.status_code == 200, response.text
    assert response.headers["x-bpo-applied"] == "true"
    sent = orjson.loads(upstream.requests_to("/v1/chat/completions")[-1].body)
    assert sent["messages"][-1]["content"] == default_rewrite("Say hi")
    assert depth_of(sent["x"]) == depth


def depth_of(value: list[Any]) -> int:
    depth = 0
    while value:
        assert len(value) == 1
        value, depth = value[0], depth + 1
    return depth + 1


def test_deep_json_with_a_huge_integer_is_a_400(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy()
    response = post(proxy.base_url, nested(1010, b',"n":123456789012345678901234567890'))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
