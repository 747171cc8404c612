"""Model routes from a LiteLLM-style model_list: the fast path, Azure, the litellm path, models, passthrough."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import openai

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
    assert sample.labels == {"arm": "none", "applied": "true", "reason": ""} and sample.value == 1
    assert families["bpo_cache_events"].samples
    optimizer_counts = [s for s in families["bpo_optimizer_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in optimizer_counts] == [({"backend": "remote"}, 1.0)]
    upstream_tokens = [s for s in families["bpo_upstream_tokens"].samples if s.name.endswith("_total")]
    assert {s.labels["kind"]: s.value for s in upstream_tokens} == {
        "prompt": answer.usage.prompt_tokens, "completion": answer.usage.completion_tokens}
