"""Upstreams that break: a cut or silent stream is never passed off as a whole answer; deadlines hold."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply, sse_chunks

from .conftest import StartProxy

USER = [{"role": "user", "content": "tell me a long story"}]
WORDS = " ".join(f"w{i}" for i in range(40))


def broken_counts(proxy: RunningProxy) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(proxy.url + "/metrics").text)}
    family = families.get("bpo_upstream_stream_errors")
    samples = family.samples if family else []
    return {s.labels["reason"]: s.value for s in samples if s.name.endswith("_total")}


def stream_text(client: openai.OpenAI) -> str:
    text = ""
    for chunk in client.chat.completions.create(model="fake-model", messages=USER, stream=True):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return text


@pytest.mark.parametrize(("reply", "reason", "timeout"), [
    (Reply(sse=sse_chunks("fake-model", WORDS), cut_after=5), "cut", 60),
    (Reply(sse=sse_chunks("fake-model", WORDS), stall_after=5, stall_seconds=30), "idle", 1.5),
], ids=["cut", "idle"])
def test_a_broken_stream_raises_in_the_official_sdk_and_is_counted(upstream: FakeUpstream,
                                                                   start_proxy: StartProxy, reply: Reply,
                                                                   reason: str, timeout: float) -> None:
    upstream.responders["/v1/chat/completions"] = lambda rec: reply
    proxy = start_proxy(upstream_timeout=timeout, optimizer="none")
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=60)
    with pytest.raises(openai.APIError) as caught:
        stream_text(client)
    assert "incomplete" in caught.value.message
    assert "127.0.0.1" not in caught.value.message
    assert broken_counts(proxy) == {reason: 1.0}


def test_the_error_event_follows_whole_events_only(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    """The provider's connection broke inside an event: its half is never glued to the error event."""
    whole = sse_chunks("fake-model", "one two")[:2]
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        sse=[whole[0], whole[1] + b'data: {"id": "chatcmpl-fake", "choi'], cut_after=2)
    proxy = start_proxy(optimizer="none")
    response = httpx.post(proxy.base_url + "/chat/completions", timeout=60,
                          json={"model": "fake-model", "messages": USER, "stream": True})
    assert response.status_code == 200
    relayed, error = response.content.split(b"event: error\n")
    assert relayed == whole[0] + whole[1]
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "upstream_stream_broken"


def test_passthrough_streams_end_with_the_error_event_too(upstream: FakeUpstream,
                                                          start_proxy: StartProxy) -> None:
    upstream.responders["/v1/responses"] = lambda rec: Reply(
        sse=[b'event: response.created\ndata: {"type": "response.created"}\n\n'] * 3, cut_after=2)
    proxy = start_proxy(optimizer="none")
    response = httpx.post(proxy.base_url + "/responses", json={"model": "m", "input": "x", "stream": True},
                          timeout=60)
    assert response.content.count(b"response.created\n") == 2
    assert response.content.endswith(b"\n\n") and b"event: error\ndata: " in response.content
    assert broken_counts(proxy) == {"cut": 1.0}


def test_a_stream_that_ends_well_is_relayed_as_it_came(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    chunks = sse_chunks("fake-model", "all of it")
    # Events cut across chunks (and a CRLF one) still arrive whole and unchanged, and nothing is counted.
    pieces = [chunks[0][:7], chunks[0][7:] + chunks[1][:3], chunks[1][3:],
              b"data: {\"x\": 1}\r\n\r\n", *chunks[2:]]
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(sse=pieces)
    response = httpx.post(proxy.base_url + "/chat/completions", headers={"x-bpo": "off"}, timeout=60,
                          json={"model": "fake-model", "messages": USER, "stream": True})
    assert response.content == b"".join(pieces)
    assert broken_counts(proxy) == {}


@pytest.mark.parametrize("stream", [True, False])
def test_a_plain_answer_trickled_past_the_deadline_is_a_504(upstream: FakeUpstream, start_proxy: StartProxy,
                                                            stream: bool) -> None:
    """A plain JSON answer sent a byte at a time: the whole-request deadline holds, stream or not."""
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        sse=[body[i:i + 1] for i in range(len(body))], chunk_delay=0.5, media_type="application/json")
    configured = f"http://user:hunter2@127.0.0.1:{upstream.port}/v1"
    proxy = start_proxy(upstream_timeout=2, optimizer="none", upstream_base_url=configured)
    started = time.monotonic()
    response = httpx.post(proxy.base_url + "/chat/completions", timeout=60,
                          json={"model": "fake-model", "messages": USER, "stream": stream})
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout" and "within 2 s" in error["message"]
    assert "hunter2" not in response.text and "127.0.0.1" not in response.text
    assert elapsed < len(body) * 0.5 / 2  # well before the trickle would have ended


def test_a_passthrough_stream_may_outlast_the_timeout_while_it_flows(upstream: FakeUpstream,
                                                                      start_proxy: StartProxy) -> None:
    """The timeout is the longest silence inside a stream, on every route: never a cap on its length."""
    events = [b'event: response.output_text.delta\ndata: {"delta": "%d"}\n\n' % i for i in range(10)]
    upstream.responders["/v1/responses"] = lambda rec: Reply(sse=events, chunk_delay=0.5)
    proxy = start_proxy(upstream_timeout=3, optimizer="none")  # 5 s in all, never 3 s silent
    response = httpx.post(proxy.base_url + "/responses", json={"model": "m", "input": "x", "stream": True},
                          timeout=60)
    assert response.content == b"".join(events)
    assert broken_counts(proxy) == {}
