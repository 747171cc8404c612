"""Bad input and upstream failures: OpenAI-shaped errors with the right status, never a 500."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply

from .conftest import StartProxy

USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "fake-model", "messages": [', None),
    (b'[1, 2]', None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "fake-model"}', "messages"),
    (b'{"model": "fake-model", "messages": []}', "messages"),
    (b'{"model": "fake-model", "messages": ["hi"]}', "messages[0]"),
    (b'{"model": "fake-model", "messages": [{"content": "hi"}]}', "messages[0].role"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": [{"text": "a"}]}]}',
     "messages[0].content[0]"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'\xff\xfe not utf-8', None),
    (b'{"model": "fake-model", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
])
def test_malformed_requests_get_400(proxy: RunningProxy, upstream: FakeUpstream, body: bytes,
                                    param: str | None) -> None:
    response = httpx.post(proxy.base_url + "/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param)
    assert upstream.requests_to("/v1/chat/completions") == []


def test_wrong_content_type_and_bad_header_get_400(proxy: RunningProxy) -> None:
    response = httpx.post(proxy.base_url + "/chat/completions", content=b"model=x",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert_openai_error(response, 400)
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "fake-model", "messages": USER},
                          headers={"x-bpo": "sometimes"})
    assert_openai_error(response, 400)


def test_oversized_bodies_get_413(start_proxy: StartProxy) -> None:
    proxy = start_proxy(max_body_bytes=1000)
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_openai_error(httpx.post(proxy.base_url + "/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}]}'

    response = httpx.post(proxy.base_url + "/chat/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


@pytest.mark.parametrize(("status", "sdk_error"), [
    (401, openai.AuthenticationError), (404, openai.NotFoundError), (429, openai.RateLimitError),
    (500, openai.InternalServerError), (503, openai.InternalServerError)])
def test_upstream_errors_keep_status_and_body(upstream: FakeUpstream, client: openai.OpenAI, proxy: RunningProxy,
                                              status: int, sdk_error: type[Exception]) -> None:
    error = {"error": {"message": f"upstream says {status}", "type": "x", "param": None, "code": "c"}}
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        status=status, json=error, headers={"retry-after": "7"} if status == 429 else {})
    with pytest.raises(sdk_error) as caught:
        client.chat.completions.create(model="fake-model", messages=USER)
    assert f"upstream says {status}" in str(caught.value)
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "fake-model", "messages": USER})
    assert response.status_code == status and response.json() == error
    if status == 429:
        assert response.headers["retry-after"] == "7"


def test_unreachable_upstream_is_a_502_headed_and_counted(start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream_base_url="http://127.0.0.1:9/v1")
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "m", "messages": USER})
    assert_openai_error(response, 502)
    assert response.headers["x-bpo-applied"] == "true" and response.headers["x-bpo-cache"] == "miss"
    assert float(response.headers["x-bpo-overhead-ms"]) >= 0
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'bpo_requests_total{applied="true",arm="none",reason="",route="chat"} 1.0' in metrics


def test_silent_upstream_is_a_504(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(json={}, delay=2.0)
    proxy = start_proxy(upstream_timeout=0.3)
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "m", "messages": USER},
                          headers={"x-bpo": "off"})
    assert_openai_error(response, 504)
    assert response.headers["x-bpo-reason"] == "disabled"


def test_unknown_model_without_upstream_is_a_404(start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream_base_url=None)
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "nope", "messages": USER})
    assert_openai_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


def test_client_disconnect_cancels_the_upstream_stream(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        sse=[b"data: {\"n\": %d}\n\n" % i for i in range(200)], chunk_delay=0.05)
    before = upstream.disconnects
    body = {"model": "fake-model", "stream": True, "messages": USER}
    with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body, timeout=10) as response:
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    deadline = time.monotonic() + 60
    while upstream.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects == before + 1


def test_unknown_paths_and_wrong_methods_answer_in_openai_shape(proxy: RunningProxy) -> None:
    response = httpx.get(proxy.url + "/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.post(proxy.url + "/healthz")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


def test_the_gateways_own_v1_bpo_paths_are_never_forwarded(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(method, proxy.base_url + "/bpo/feedback")
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"
    response = httpx.post(proxy.base_url + "/bpo/nothing-here", json={})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert [r.path for r in upstream.requests if "/bpo" in r.path] == []
    # Other methods on the upstream's own paths still reach it: GET /v1/chat/completions lists stored completions.
    assert httpx.get(proxy.base_url + "/chat/completions").status_code != 405
    assert len(upstream.requests_to("/v1/chat/completions")) == 1


def test_a_fault_in_the_chat_service_is_a_500_in_openai_shape(proxy: RunningProxy,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: a bug the service does not expect must still answer in OpenAI's error shape.
    async def broken(shape: object, scope: object, receive: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy.app.state.rewriting, "handle", broken)
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "fake-model", "messages": USER})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "a bug" not in response.text  # internals stay in the logs


def test_upstream_response_headers_are_relayed_with_the_gateways_own(upstream: FakeUpstream,
                                                                     proxy: RunningProxy) -> None:
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(json={"id": "x", "choices": []}, headers={
        "x-request-id": "upstream-id", "openai-processing-ms": "12", "x-bpo-applied": "from-upstream"})
    response = httpx.post(proxy.base_url + "/chat/completions", json={"model": "fake-model", "messages": USER})
    assert response.status_code == 200
    assert response.headers["openai-processing-ms"] == "12"
    assert response.headers["x-upstream-request-id"] == "upstream-id"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers.get_list("x-bpo-applied") == ["true"]  # ours alone: it describes this hop
    assert int(response.headers["content-length"]) == len(response.content)
