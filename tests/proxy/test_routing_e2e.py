"""Model routes from a LiteLLM-style model_list: the fast path, Azure, the litellm path, models, passthrough."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply, chat_reply, default_rewrite

from .conftest import StartProxy


def config_file(tmp_path: Path, upstream: FakeUpstream) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        model_list:
          - model_name: house-gpt
            litellm_params:
              model: openai/fake-model
              api_base: {upstream.base_url}
              api_key: sk-from-config
          - model_name: azure-gpt
            litellm_params:
              model: azure/my-deployment
              api_base: {upstream.base_url.removesuffix("/v1")}
              api_key: azure-key
              api_version: "2024-06-01"
          - model_name: translated
            litellm_params:
              model: text-completion-openai/bpo-fake
              api_base: {upstream.base_url}
              api_key: sk-litellm
    """))
    return str(path)


def test_openai_wire_route_renames_the_model_and_uses_the_configured_key(
        tmp_path: Path, upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    client.chat.completions.create(model="house-gpt", messages=[{"role": "user", "content": "Hi there"}])
    sent = upstream.requests_to("/v1/chat/completions")[-1]
    assert sent.json["model"] == "fake-model"
    assert sent.headers["authorization"] == "Bearer sk-from-config"
    assert sent.json["messages"][0]["content"] == default_rewrite("Hi there")


def test_azure_route_uses_the_deployment_url_and_api_key_header(
        tmp_path: Path, upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    path = "/openai/deployments/my-deployment/chat/completions"
    upstream.responders[path] = lambda rec: chat_reply(rec.json)
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    answer = client.chat.completions.create(model="azure-gpt", messages=[{"role": "user", "content": "Yo"}],
                                            extra_headers={"X-BPO": "off"})
    assert answer.choices[0].message.content == "echo: Yo"
    sent = upstream.requests_to(path)[-1]
    assert sent.headers["api-key"] == "azure-key"
    assert "authorization" not in sent.headers
    assert "model" not in sent.json


def test_litellm_path_translates_a_non_openai_provider(tmp_path: Path, upstream: FakeUpstream,
                                                       start_proxy: StartProxy) -> None:
    """text-completion-openai is a provider litellm translates (chat -> /v1/completions): not the fast path."""
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None, optimizer="none")
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    answer = client.chat.completions.create(model="translated", messages=[{"role": "user", "content": "Sum 2+2"}])
    assert default_rewrite("Sum 2+2") in (answer.choices[0].message.content or "")
    assert upstream.requests_to("/v1/chat/completions") == []
    sent = upstream.requests_to("/v1/completions")[-1]
    assert "Sum 2+2" in sent.json["prompt"] and sent.headers["authorization"] == "Bearer sk-litellm"
    stream = client.chat.completions.create(model="translated", stream=True,
                                            messages=[{"role": "user", "content": "Stream it"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert default_rewrite("Stream it") in text


def test_litellm_path_keeps_provider_error_status(tmp_path: Path, upstream: FakeUpstream,
                                                  start_proxy: StartProxy) -> None:
    upstream.responders["/v1/completions"] = lambda rec: Reply(
        status=429, json={"error": {"message": "slow down", "type": "rate_limit"}})
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None, optimizer="none")
    response = httpx.post(proxy.base_url + "/chat/completions",
                          json={"model": "translated", "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert response.status_code == 429
    assert response.json()["error"]["message"]


def test_models_lists_configured_routes_and_the_upstreams(tmp_path: Path, upstream: FakeUpstream,
                                                          start_proxy: StartProxy) -> None:
    proxy = start_proxy(config=config_file(tmp_path, upstream))
    ids = [m.id for m in openai.OpenAI(base_url=proxy.base_url, api_key="k").models.list()]
    assert ids == ["house-gpt", "azure-gpt", "translated", "fake-model", "bpo-fake"]
    only_config = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None)
    assert [m["id"] for m in httpx.get(only_config.base_url + "/models").json()["data"]] == [
        "house-gpt", "azure-gpt", "translated"]


def test_other_v1_paths_are_forwarded_unchanged(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    upstream.responders["/v1/embeddings"] = lambda rec: Reply(json={
        "object": "list", "model": "emb", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    result = client.embeddings.create(model="emb", input="hello", encoding_format="float")
    assert result.data[0].embedding == [0.5, 0.25]
    sent = upstream.requests_to("/v1/embeddings")[-1]
    assert sent.json == {"model": "emb", "input": "hello", "encoding_format": "float"}
    assert sent.headers["authorization"] == "Bearer sk-client"
    response = httpx.delete(proxy.base_url + "/files/file-1?purpose=x", headers={"x-bpo": "off"})
    assert response.json() == {"object": "echo", "path": "/v1/files/file-1", "method": "DELETE"}
    assert "x-bpo" not in upstream.requests_to("/v1/files/file-1")[-1].headers


def test_health_readiness_and_metrics(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    assert httpx.get(proxy.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(proxy.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["optimizer"]["state"] == "ready" and ready.json()["cache"]["backend"] == "memory"
    answer = openai.OpenAI(base_url=proxy.base_url, api_key="k").chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "count me"}])
    assert answer.usage is not None
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(proxy.url + "/metrics").text)}
    (sample,) = [s for s in families["bpo_requests"].samples if s.name == "bpo_requests_total"]
    assert sample.labels == {"arm": "none", "applied": "true", "reason": "", "route": "chat"} and sample.value == 1
    assert families["bpo_cache_events"].samples
    optimizer_counts = [s for s in families["bpo_optimizer_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in optimizer_counts] == [({"backend": "remote"}, 1.0)]
    upstream_tokens = [s for s in families["bpo_upstream_tokens"].samples if s.name.endswith("_total")]
    assert {s.labels["kind"]: s.value for s in upstream_tokens} == {
        "prompt": answer.usage.prompt_tokens, "completion": answer.usage.completion_tokens}


@pytest.mark.parametrize("field", ["api_base", "api_key", "base_url", "mock_response", "vertex_credentials",
                                   "litellm_logging_obj", "extra_headers"])
def test_litellm_path_refuses_provider_settings_in_the_body(tmp_path: Path, upstream: FakeUpstream,
                                                            start_proxy: StartProxy, field: str) -> None:
    """A body field must never redirect the route's configured key to another endpoint."""
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None, optimizer="none")
    response = httpx.post(proxy.base_url + "/chat/completions", timeout=30, json={
        "model": "translated", "messages": [{"role": "user", "content": "x"}], field: "http://127.0.0.1:9/v1"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert upstream.requests_to("/v1/completions") == []


def test_passthrough_keeps_the_raw_path_and_repeated_query_keys(upstream: FakeUpstream,
                                                                proxy: RunningProxy) -> None:
    response = httpx.get(proxy.base_url + "/files/a%2Fb/content?tag=x&tag=y&q=%3F")
    assert response.status_code == 200
    sent = upstream.requests[-1]
    assert sent.raw_path == "/v1/files/a%2Fb/content"
    assert sent.query == "tag=x&tag=y&q=%3F"


def test_models_still_lists_configured_routes_when_the_upstream_fails(tmp_path: Path, upstream: FakeUpstream,
                                                                    start_proxy: StartProxy) -> None:
    upstream.responders["/v1/models"] = lambda rec: Reply(status=500, json={"error": {"message": "down"}})
    proxy = start_proxy(config=config_file(tmp_path, upstream))
    assert [m["id"] for m in httpx.get(proxy.base_url + "/models").json()["data"]] == [
        "house-gpt", "azure-gpt", "translated"]
    bare = start_proxy()
    assert httpx.get(bare.base_url + "/models").status_code == 500


def test_litellm_stream_client_disconnect_cancels_the_provider_stream(tmp_path: Path, upstream: FakeUpstream,
                                                                      start_proxy: StartProxy) -> None:
    pieces = [b'data: {"id": "c", "object": "text_completion", "created": 1, "model": "bpo-fake", '
              b'"choices": [{"index": 0, "text": "w%d ", "finish_reason": null}]}\n\n' % i for i in range(200)]
    upstream.responders["/v1/completions"] = lambda rec: Reply(sse=pieces, chunk_delay=0.05)
    proxy = start_proxy(config=config_file(tmp_path, upstream), upstream_base_url=None, optimizer="none")
    before = upstream.disconnects
    body = {"model": "translated", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body, timeout=30) as response:
        assert next(response.iter_raw()).startswith(b"data: ")
    deadline = time.monotonic() + 60
    while upstream.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.disconnects == before + 1
