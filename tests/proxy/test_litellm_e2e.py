"""The litellm path fails like the fast path: --upstream-timeout, 502/504, OpenAI's error shape, no traceback."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply

from .conftest import StartProxy

USER = [{"role": "user", "content": "a prompt that must stay private"}]


def config_file(tmp_path: Path, upstream: FakeUpstream) -> str:
    """Two providers litellm translates (neither speaks OpenAI's chat wire), and one nobody listens for."""
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        model_list:
          - model_name: completions
            litellm_params:
              model: text-completion-openai/bpo-fake
              api_base: {upstream.base_url}
              api_key: sk-litellm
          - model_name: claude
            litellm_params:
              model: anthropic/claude-fake
              api_base: http://127.0.0.1:{upstream.port}
              api_key: sk-ant-route
          - model_name: nobody-home
            litellm_params:
              model: anthropic/claude-fake
              api_base: http://127.0.0.1:9
              api_key: sk-ant-route
    """))
    return str(path)


def start(tmp_path: Path, upstream: FakeUpstream, start_proxy: StartProxy, **values: object) -> RunningProxy:
    return start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None, optimizer="none",
                       **values)


def post(proxy: RunningProxy, model: str) -> httpx.Response:
    return httpx.post(proxy.base_url + "/chat/completions", json={"model": model, "messages": USER}, timeout=120)


def assert_clean_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    for leak in ("Traceback", 'File "', "site-packages", "127.0.0.1", "private", "sk-ant"):
        assert leak not in error["message"], error["message"]


def test_an_unreachable_provider_is_a_502(tmp_path: Path, upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    assert_clean_error(post(start(tmp_path, upstream, start_proxy), "nobody-home"), 502, "upstream_unreachable")


def test_a_silent_provider_is_a_504_at_the_upstream_timeout(tmp_path: Path, upstream: FakeUpstream,
                                                            start_proxy: StartProxy) -> None:
    upstream.responders["/v1/messages"] = lambda rec: Reply(json={}, delay=60)
    upstream.responders["/v1/completions"] = lambda rec: Reply(json={}, delay=60)
    proxy = start(tmp_path, upstream, start_proxy, upstream_timeout=2)
    for model in ("claude", "completions"):
        started = time.monotonic()
        response = post(proxy, model)
        assert time.monotonic() - started < 30  # litellm's own default would wait 6000 s
        assert_clean_error(response, 504, "upstream_timeout")
        assert "within 2 s" in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "reply"), [
    ("/v1/messages", Reply(json={"id": "msg", "echo": "a prompt that must stay private"})),
    ("/v1/messages", Reply(raw=b"<html>a prompt that must stay private", headers={"content-type": "text/html"})),
    ("/v1/completions", Reply(raw=b"not json: a prompt that must stay private",
                              headers={"content-type": "application/json"})),
], ids=["anthropic-wrong-shape", "anthropic-html", "completions-not-json"])
def test_an_unreadable_answer_is_a_502_without_traceback(tmp_path: Path, upstream: FakeUpstream,
                                                         start_proxy: StartProxy, path: str, reply: Reply,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    upstream.responders[path] = lambda rec: reply
    proxy = start(tmp_path, upstream, start_proxy)
    response = post(proxy, "claude" if path == "/v1/messages" else "completions")
    assert_clean_error(response, 502, "upstream_bad_response")
    assert "private" not in caplog.text


def test_a_provider_error_keeps_its_status_and_message(tmp_path: Path, upstream: FakeUpstream,
                                                       start_proxy: StartProxy) -> None:
    upstream.responders["/v1/messages"] = lambda rec: Reply(status=429, headers={"retry-after": "3"}, json={
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down please"}})
    response = post(start(tmp_path, upstream, start_proxy), "claude")
    assert response.status_code == 429 and "slow down please" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "3"


def test_a_provider_stream_gone_silent_raises_in_the_sdk_and_is_counted(tmp_path: Path, upstream: FakeUpstream,
                                                                        start_proxy: StartProxy) -> None:
    pieces = [b'data: {"id": "c", "object": "text_completion", "created": 1, "model": "bpo-fake", '
              b'"choices": [{"index": 0, "text": "w%d ", "finish_reason": null}]}\n\n' % i for i in range(20)]
    upstream.responders["/v1/completions"] = lambda rec: Reply(sse=pieces, stall_after=3, stall_seconds=60)
    proxy = start(tmp_path, upstream, start_proxy, upstream_timeout=2)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=120)
    text = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="completions", messages=USER, stream=True):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text.startswith("w0 ") and "within 2 s" in caught.value.message
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(proxy.url + "/metrics").text)}
    samples = families["bpo_upstream_stream_errors"].samples
    assert [(s.labels, s.value) for s in samples if s.name.endswith("_total")] == [({"reason": "idle"}, 1.0)]
