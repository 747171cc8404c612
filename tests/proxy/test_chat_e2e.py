"""End to end: the openai SDK -> the real gateway -> the fake provider, on loopback."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import pytest

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Reply, default_rewrite, sse_chunks

from .conftest import StartProxy

REWRITE_SUFFIX = default_rewrite("")  # what the fake optimizer appends to every prompt


def without_last_user_content(body: dict[str, Any]) -> dict[str, Any]:
    messages = [dict(m) for m in body["messages"]]
    messages[-1].pop("content")
    return {**body, "messages": messages}


def post_rewritten(proxy: RunningProxy, raw: bytes) -> None:
    """POST raw JSON bytes; the gateway must answer 200 with the prompt rewritten."""
    response = httpx.post(proxy.base_url + "/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.headers["x-bpo-applied"] == "true", response.text


def test_upstream_sees_the_rewritten_prompt_and_nothing_else_changed(upstream: FakeUpstream,
                                                                     client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Earlier question"},
                {"role": "assistant", "content": "Earlier answer"},
                {"role": "user", "content": "Tell me about llamas"}]
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, temperature=0.3, n=2, logprobs=True, top_logprobs=2,
        response_format={"type": "json_object"}, user="u-1", extra_body={"vendor_field": {"x": [1, 2]}})
    completion = raw.parse()
    sent = upstream.requests_to("/v1/chat/completions")[-1].json
    assert sent["messages"][-1]["content"] == default_rewrite("Tell me about llamas")
    assert without_last_user_content(sent) == without_last_user_content(
        {"model": "fake-model", "messages": messages, "temperature": 0.3, "n": 2, "logprobs": True,
         "top_logprobs": 2, "response_format": {"type": "json_object"}, "user": "u-1",
         "vendor_field": {"x": [1, 2]}})
    assert len(completion.choices) == 2
    assert completion.choices[0].message.content == "echo: " + default_rewrite("Tell me about llamas")
    assert raw.headers["x-bpo-applied"] == "true"
    assert "x-bpo-reason" not in raw.headers
    assert raw.headers["x-bpo-cache"] == "miss"
    assert raw.headers["x-bpo-optimizer"].startswith("remote:")
    assert float(raw.headers["x-bpo-overhead-ms"]) >= 0
    assert raw.headers["x-request-id"].startswith("req_")


def test_a_repeated_prompt_is_served_from_the_cache(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    for expected in ("miss", "hit"):
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "Name three rivers"}])
        assert raw.headers["x-bpo-cache"] == expected
    assert len(upstream.requests_to("/v1/completions")) == 1
    assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][0]["content"] == \
        default_rewrite("Name three rivers")


def test_stream_chunks_reach_the_client_byte_for_byte(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "Count to five"}]}
    expected = b"".join(sse_chunks("fake-model", "echo: " + default_rewrite("Count to five")))
    with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body, timeout=10) as response:
        received = b"".join(response.iter_raw())
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-bpo-applied"] == "true"
    assert received == expected


def test_sdk_streams_sync_and_async(client: openai.OpenAI, proxy: RunningProxy) -> None:
    stream = client.chat.completions.create(model="fake-model", stream=True,
                                            messages=[{"role": "user", "content": "Say hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip() == "echo: " + default_rewrite("Say hi")

    async def run_async() -> str:
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model="fake-model", stream=True, messages=[{"role": "user", "content": "Say bye"}],
                stream_options={"include_usage": True})
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return "".join(parts)

    import asyncio

    assert asyncio.run(run_async()).strip() == "echo: " + default_rewrite("Say bye")


def test_content_parts_rewrite_text_and_keep_images(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
    content = [{"type": "text", "text": "What animal is this"}, image]
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": content}])
    sent = upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"]
    assert sent == [{"type": "text", "text": default_rewrite("What animal is this")}, image]


def test_tool_turns_are_forwarded_byte_for_byte(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    body = {"model": "fake-model",
            "messages": [{"role": "user", "content": "weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "call_1", "type": "function",
                              "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "21C"}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    raw = json.dumps(body, indent=1).encode()
    response = httpx.post(proxy.base_url + "/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.headers["x-bpo-applied"] == "false"
    assert response.headers["x-bpo-reason"] == "not-user-turn"
    assert upstream.requests_to("/v1/chat/completions")[-1].body == raw
    assert upstream.requests_to("/v1/completions") == []


@pytest.mark.parametrize(("header", "applied", "reason"), [
    ("off", "false", "disabled"), ("on", "true", None), ("aggressive", "true", None), ("stable", "true", None)])
def test_x_bpo_header_toggles_the_rewrite(upstream: FakeUpstream, client: openai.OpenAI, header: str,
                                          applied: str, reason: str | None) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Plan a trip"}], extra_headers={"X-BPO": header})
    assert raw.headers["x-bpo-applied"] == applied
    assert raw.headers.get("x-bpo-reason") == reason
    sent = upstream.requests_to("/v1/chat/completions")[-1]
    assert not any(name.lower().startswith("x-bpo") for name in sent.headers)
    if header == "aggressive":
        assert upstream.requests_to("/v1/completions")[-1].json["temperature"] == 0.9


def test_off_by_default_still_obeys_the_header(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(optimize_by_default=False)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "Plan a party"}]
    assert client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages).headers["x-bpo-reason"] == "disabled"
    assert client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, extra_headers={"X-BPO": "on"}).headers["x-bpo-applied"] == "true"


def test_debug_header_echoes_the_optimized_prompt(client: openai.OpenAI) -> None:
    prompt = "Explain 'ça va' in Français"
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}], extra_headers={"X-BPO-Debug": "1"})
    assert unquote(raw.headers["x-bpo-optimized-prompt"]) == default_rewrite(prompt)
    plain = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}])
    assert "x-bpo-optimized-prompt" not in plain.headers


def test_client_authorization_is_forwarded_unless_a_key_is_configured(upstream: FakeUpstream,
                                                                      start_proxy: StartProxy) -> None:
    messages = [{"role": "user", "content": "hello"}]
    for settings, expected in (({}, "Bearer sk-client"), ({"upstream_api_key": "sk-server"}, "Bearer sk-server")):
        proxy = start_proxy(**settings)
        openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0).chat.completions.create(
            model="fake-model", messages=messages)
        assert upstream.requests_to("/v1/chat/completions")[-1].headers["authorization"] == expected


def test_slow_optimizer_fails_open_with_timeout(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    upstream.responders["/v1/completions"] = lambda rec: Reply(json={"choices": [{"text": "late"}]}, delay=1.0)
    proxy = start_proxy(optimizer_timeout=0.2)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Write a haiku"}])
    assert raw.headers["x-bpo-applied"] == "false"
    assert raw.headers["x-bpo-reason"] == "timeout"
    assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][0]["content"] == "Write a haiku"
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'bpo_requests_total{applied="false",arm="none",reason="timeout",route="chat"} 1.0' in metrics


def test_broken_optimizer_fails_open(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    upstream.responders["/v1/completions"] = lambda rec: Reply(status=500, json={"error": {"message": "boom"}})
    proxy = start_proxy()
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Write a limerick"}])
    assert raw.headers["x-bpo-applied"] == "false"
    assert raw.headers["x-bpo-reason"] == "optimizer-error"
    assert raw.headers["x-bpo-cache"] == "off"  # a failure is not cached: no "miss" that promises a hit
    assert raw.parse().choices[0].message.content == "echo: Write a limerick"
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'bpo_fail_open_total{component="optimizer"} 1.0' in metrics


def test_unreachable_optimizer_fails_open_and_readyz_says_loading(upstream: FakeUpstream,
                                                                  start_proxy: StartProxy) -> None:
    proxy = start_proxy(optimizer="remote:http://127.0.0.1:9/v1")
    ready = httpx.get(proxy.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Sing"}])
    assert raw.headers["x-bpo-applied"] == "false"
    assert raw.headers["x-bpo-reason"] == "optimizer-unavailable"
    assert raw.headers["x-bpo-cache"] == "off"
    assert raw.headers["x-bpo-optimizer"] == "remote:http://127.0.0.1:9/v1@pending"  # still probing
    assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][0]["content"] == "Sing"


def test_long_prompts_are_left_alone(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(max_prompt_chars=20)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    prompt = "x" * 21
    raw = client.chat.completions.with_raw_response.create(model="fake-model",
                                                           messages=[{"role": "user", "content": prompt}])
    assert raw.headers["x-bpo-reason"] == "too-long"
    assert upstream.requests_to("/v1/completions") == []


def test_values_json_allows_but_fast_parsers_refuse_survive_the_rewrite(upstream: FakeUpstream,
                                                                      proxy: RunningProxy) -> None:
    raw = b'{"model": "fake-model", "seed": 123456789012345678901234567890, "temperature": 1e2, ' \
          b'"messages": [{"role": "user", "content": "Caf\\u00e9 \\ud83d\\ude00 prices"}]}'
    post_rewritten(proxy, raw)
    sent = upstream.requests_to("/v1/chat/completions")[-1].json
    assert sent["seed"] == 123456789012345678901234567890 and sent["temperature"] == 100.0
    assert sent["messages"][0]["content"] == default_rewrite("Café 😀 prices")


def test_a_lone_surrogate_escape_is_forwarded_not_a_500(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    raw = b'{"model": "fake-model", "messages": [{"role": "system", "content": "odd \\ud800 char"}, ' \
          b'{"role": "user", "content": "Summarize this"}]}'
    post_rewritten(proxy, raw)
    sent = upstream.requests_to("/v1/chat/completions")[-1].json
    assert sent["messages"][0]["content"] == "odd \ud800 char"


@pytest.mark.parametrize("seed", ["18446744073709551616", "-9999999999999999999"])
def test_integers_just_past_64_bits_survive_the_rewrite(seed: str, upstream: FakeUpstream,
                                                        proxy: RunningProxy) -> None:
    raw = f'{{"model": "fake-model", "seed": {seed}, "messages": [{{"role": "user", "content": "Sing"}}]}}'
    post_rewritten(proxy, raw.encode())
    assert upstream.requests_to("/v1/chat/completions")[-1].json["seed"] == int(seed)


def test_nan_the_client_sent_is_forwarded_as_nan(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    raw = b'{"model": "fake-model", "logit_bias": {"1": NaN}, "messages": [{"role": "user", "content": "Sing"}]}'
    post_rewritten(proxy, raw)
    assert b'"logit_bias": {"1": NaN}' in upstream.requests_to("/v1/chat/completions")[-1].body


def test_an_optimizer_named_beyond_ascii_is_named_percent_encoded(upstream: FakeUpstream,
                                                                   start_proxy: StartProxy) -> None:
    proxy = start_proxy(optimizer_model="bpo-模型")
    response = httpx.post(proxy.base_url + "/chat/completions",
                          json={"model": "fake-model", "messages": [{"role": "user", "content": "Sing"}]})
    assert response.status_code == 200, response.text  # a header that cannot be encoded was a 500
    assert unquote(response.headers["x-bpo-optimizer"]).startswith("remote:bpo-模型"), response.headers
