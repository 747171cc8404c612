"""Nothing secret leaves the gateway: no URL credentials, no internal address, no prompt in a log line."""

from __future__ import annotations

import base64
import logging
import time

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream, Reply

from .conftest import StartProxy

PROMPT = "my private diagnosis is quite serious"


def chat(base_url: str, mode: str = "on") -> httpx.Response:
    return httpx.post(base_url + "/chat/completions", timeout=60,
                      headers={"x-bpo": mode, "authorization": "Bearer sk-client"},
                      json={"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}]})


def test_passwords_in_urls_are_never_shown(upstream: FakeUpstream, start_proxy: StartProxy,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    where = f"127.0.0.1:{upstream.port}"
    proxy = start_proxy(optimizer=f"remote:http://bpo:optimizer-pw@{where}/v1",
                        upstream_base_url=f"http://gw:upstream-pw@{where}/v1", upstream_timeout=3)
    seen = [httpx.get(proxy.url + "/readyz").text]  # perhaps still probing: the pending identity shows too
    deadline = time.monotonic() + 30
    while httpx.get(proxy.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = chat(proxy.base_url)
    assert answer.status_code == 200 and answer.headers["x-bpo-applied"] == "true"
    # The credentials still work: they are sent as Basic auth, just never shown.
    sent = upstream.requests_to("/v1/completions")[-1].headers["authorization"]
    assert base64.b64decode(sent.removeprefix("Basic ")) == b"bpo:optimizer-pw"
    sent = upstream.requests_to("/v1/chat/completions")[-1].headers["authorization"]
    assert base64.b64decode(sent.removeprefix("Basic ")) == b"gw:upstream-pw"  # in place of the client's
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(json={}, delay=20)
    timed_out = chat(proxy.base_url, "off")
    assert timed_out.status_code == 504
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(sse=[b"data: {}\n\n"] * 3, cut_after=1)
    broken = httpx.post(proxy.base_url + "/chat/completions", headers={"x-bpo": "off"}, timeout=60, json={
        "model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    seen += [str(answer.headers), httpx.get(proxy.url + "/readyz").text, timed_out.text, broken.text]
    for text in [*seen, caplog.text]:
        assert "optimizer-pw" not in text and "upstream-pw" not in text
    for body in (timed_out.text, broken.text):  # what clients see names no internal address either
        assert "127.0.0.1" not in body and "upstream_" in body


def test_an_unreachable_upstream_is_not_named_to_the_client(start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream_base_url="http://gw:upstream-pw@127.0.0.1:9/v1", optimizer="none")
    response = chat(proxy.base_url)
    assert response.status_code == 502
    assert "127.0.0.1" not in response.text and "upstream-pw" not in response.text


@pytest.mark.parametrize("mode", ["stable", "aggressive"])
def test_an_optimizer_error_echoing_the_prompt_is_never_logged(upstream: FakeUpstream, start_proxy: StartProxy,
                                                               caplog: pytest.LogCaptureFixture, mode: str) -> None:
    """A refusal that quotes the request: the aggressive mode's first one also names min_tokens."""
    caplog.set_level(logging.DEBUG)
    replies = iter([
        Reply(status=400, json={"error": {"message": f"min_tokens is not allowed in {PROMPT}"}}),
        Reply(status=422, json={"detail": [{"loc": ["body", "prompt"], "msg": "bad", "input": PROMPT}]}),
    ] if mode == "aggressive" else [Reply(status=500, raw=f"Internal error while handling {PROMPT}".encode())])
    upstream.responders["/v1/completions"] = lambda rec: next(replies)
    proxy = start_proxy()
    deadline = time.monotonic() + 30
    while httpx.get(proxy.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    response = chat(proxy.base_url, mode)
    assert response.status_code == 200 and response.headers["x-bpo-reason"] == "optimizer-error"
    assert "optimizer failed" in caplog.text  # the fault is logged, its foreign text is not
    assert "diagnosis" not in caplog.text
