"""End to end: the anthropic SDK -> the real gateway's /v1/messages -> the fake provider, on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply, default_rewrite, messages_reply

from .conftest import StartProxy

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
THINKING = {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig-abc=="}


@pytest.fixture
def messages_proxy(start_proxy: StartProxy, upstream: FakeUpstream) -> RunningProxy:
    return start_proxy(anthropic_base_url=upstream.base_url)


@pytest.fixture
def claude(messages_proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=messages_proxy.url, api_key="sk-ant-client", max_retries=0)


def client_key(headers: dict[str, str]) -> str:
    """The client's key as the provider got it: the SDK sends x-api-key or a bearer token."""
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


def without_last_turn(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "messages": body["messages"][:-1]}


def test_the_last_user_turn_is_rewritten_and_nothing_else_changes(upstream: FakeUpstream,
                                                                  claude: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    messages: list[Any] = [{"role": "user", "content": "Earlier question"},
                           {"role": "assistant", "content": [THINKING, {"type": "text", "text": "Earlier answer"}]},
                           {"role": "user", "content": [
                               {"type": "text", "text": "What animal is this",
                                "cache_control": {"type": "ephemeral"}}, IMAGE]}]
    raw = claude.messages.with_raw_response.create(
        model="claude-fake", max_tokens=64, system=system, messages=messages, stop_sequences=["END"],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    message = raw.parse()
    recorded = upstream.requests_to("/v1/messages")[-1]
    sent = recorded.json
    assert without_last_turn(sent) == without_last_turn(
        {"model": "claude-fake", "max_tokens": 64, "system": system, "messages": messages, "stop_sequences": ["END"]})
    assert sent["messages"][-1]["content"] == [
        {"type": "text", "text": default_rewrite("What animal is this"), "cache_control": {"type": "ephemeral"}},
        IMAGE]
    assert client_key(recorded.headers) == "sk-ant-client"
    assert recorded.headers["anthropic-version"] and recorded.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert message.content[0].text == "echo: " + default_rewrite("What animal is this")  # type: ignore[union-attr]
    assert raw.headers["x-bpo-applied"] == "true" and raw.headers["x-bpo-cache"] == "miss"
    assert raw.headers["x-request-id"].startswith("req_") and float(raw.headers["x-bpo-overhead-ms"]) >= 0


def test_tool_use_with_a_tool_result_is_forwarded_byte_for_byte(upstream: FakeUpstream,
                                                                messages_proxy: RunningProxy) -> None:
    body = {"model": "claude-fake", "max_tokens": 64,
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "weather in Paris?"},
                         {"role": "assistant", "content": [
                             THINKING, {"type": "tool_use", "id": "tu_1", "name": "weather",
                                        "input": {"city": "Paris"}}]},
                         {"role": "user", "content": [
                             {"type": "tool_result", "tool_use_id": "tu_1", "content": "21C"}]}]}
    raw = json.dumps(body, indent=1).encode()
    response = httpx.post(messages_proxy.url + "/v1/messages", content=raw,
                          headers={"content-type": "application/json", "x-api-key": "k"})
    assert response.status_code == 200 and response.headers["x-bpo-reason"] == "not-user-turn"
    assert upstream.requests_to("/v1/messages")[-1].body == raw
    assert upstream.requests_to("/v1/completions") == []


def test_sdk_tool_round_trip(upstream: FakeUpstream, claude: anthropic.Anthropic) -> None:
    tool_use = {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"city": "Paris"}}
    result = {"type": "tool_result", "tool_use_id": "tu_1", "content": [{"type": "text", "text": "21C"}]}
    claude.messages.create(model="claude-fake", max_tokens=64, messages=[
        {"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": [result, {"type": "text", "text": "And tomorrow?"}]}])
    sent = upstream.requests_to("/v1/messages")[-1].json["messages"]
    assert sent[1]["content"] == [tool_use]
    assert sent[2]["content"] == [result, {"type": "text", "text": default_rewrite("And tomorrow?")}]


def test_streams_are_relayed_as_sent(upstream: FakeUpstream, messages_proxy: RunningProxy) -> None:
    body = {"model": "claude-fake", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "Count to five"}]}

    def streamed(x_bpo: str) -> tuple[bytes, httpx.Headers]:
        with httpx.stream("POST", messages_proxy.url + "/v1/messages", json=body, timeout=30,
                          headers={"x-bpo": x_bpo, "anthropic-version": "2023-06-01"}) as response:
            return b"".join(response.iter_raw()), response.headers

    plain, plain_headers = streamed("off")
    rewritten, headers = streamed("on")
    assert plain_headers["x-bpo-applied"] == "false" and headers["x-bpo-applied"] == "true"
    assert plain == b"".join(messages_reply(body).sse or [])
    rewritten_body = {**body, "messages": [{"role": "user", "content": default_rewrite("Count to five")}]}
    assert rewritten == b"".join(messages_reply(rewritten_body).sse or [])


def test_sdk_stream_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="claude-fake", max_tokens=64,
                                messages=[{"role": "user", "content": "Say hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() == "echo: " + default_rewrite("Say hi")
    assert final.stop_reason == "end_turn"


def test_errors_are_in_anthropics_shape(upstream: FakeUpstream, claude: anthropic.Anthropic,
                                        messages_proxy: RunningProxy) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="claude-fake", max_tokens=8, messages=[])
    assert bad.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "'messages' is required and must be a non-empty array."}}
    response = httpx.post(messages_proxy.url + "/v1/messages", content=b"{nope",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["type"] == "error"
    # The provider's own errors come back as sent (status, body, Retry-After): SDK retries keep working.
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    upstream.responders["/v1/messages"] = lambda rec: Reply(status=529, json=overloaded, headers={"retry-after": "1"})
    with pytest.raises(anthropic.APIStatusError) as failed:
        claude.messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 529 and failed.value.body == overloaded


def test_count_tokens_passes_through(upstream: FakeUpstream, claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="claude-fake", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == 42
    recorded = upstream.requests_to("/v1/messages/count_tokens")[-1]
    assert recorded.json["messages"] == [{"role": "user", "content": "hi"}]
    assert client_key(recorded.headers) == "sk-ant-client"
    assert upstream.requests_to("/v1/completions") == []


def test_an_anthropic_route_uses_its_base_and_its_key(upstream: FakeUpstream, start_proxy: StartProxy,
                                                      tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "claude", "litellm_params": {
        "model": "anthropic/claude-3-5-sonnet", "api_base": upstream.base_url, "api_key": "sk-ant-route"}}]}))
    proxy = start_proxy(config=str(config), anthropic_base_url="http://127.0.0.1:9")  # the default is unused
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0)
    client.messages.create(model="claude", max_tokens=8, messages=[{"role": "user", "content": "Say hi"}])
    recorded = upstream.requests_to("/v1/messages")[-1]
    assert recorded.headers["x-api-key"] == "sk-ant-route" and "authorization" not in recorded.headers
    assert recorded.json["model"] == "claude-3-5-sonnet"
    assert recorded.json["messages"][0]["content"] == default_rewrite("Say hi")


def test_other_providers_go_through_litellms_messages_entry_point(upstream: FakeUpstream, start_proxy: StartProxy,
                                                                  tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "gpt", "litellm_params": {
        "model": "openai/fake-model", "api_base": upstream.base_url, "api_key": "sk-route"}}]}))
    proxy = start_proxy(config=str(config))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0)
    message = client.messages.create(model="gpt", max_tokens=8, messages=[{"role": "user", "content": "Say hi"}])
    assert message.content[0].text == "echo: " + default_rewrite("Say hi")  # type: ignore[union-attr]
    # litellm translates for OpenAI models by way of the Responses API: the rewrite reached it, with the route's key.
    recorded = upstream.requests_to("/v1/responses")[-1]
    assert recorded.headers["authorization"] == "Bearer sk-route"
    assert default_rewrite("Say hi") in recorded.body.decode()


def test_client_auth_refuses_in_anthropics_shape(upstream: FakeUpstream, start_proxy: StartProxy,
                                                 tmp_path: Path) -> None:
    proxy = start_proxy(anthropic_base_url=upstream.base_url, key_store=f"sqlite:{tmp_path / 'keys.db'}",
                        client_auth="on", optimizer="none")
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-bpo-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "The client key is not valid (unknown or revoked).",
        "code": "invalid_api_key"}}
    assert upstream.requests_to("/v1/messages") == []


def test_a_responses_request_on_a_litellm_route_goes_through_litellm_aresponses(
        upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "claude", "litellm_params": {
        "model": "anthropic/claude-fake", "api_base": upstream.base_url.removesuffix("/v1"),
        "api_key": "sk-ant-route"}}]}))
    proxy = start_proxy(config=str(config))
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    raw = client.responses.with_raw_response.create(model="claude", input="Say hi", max_output_tokens=32)
    assert raw.headers["x-bpo-applied"] == "true"
    assert raw.parse().output_text == "echo: " + default_rewrite("Say hi")
    recorded = upstream.requests_to("/v1/messages")[-1]  # litellm spoke Anthropic's API to the provider
    assert recorded.headers["x-api-key"] == "sk-ant-route"
