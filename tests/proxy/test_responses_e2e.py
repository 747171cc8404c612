"""End to end: the openai SDK's Responses API -> the real gateway -> the fake provider, on loopback."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, default_rewrite, responses_reply

IMAGE = {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}


def test_a_string_input_is_rewritten_and_nothing_else_changes(upstream: FakeUpstream,
                                                              client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="fake-model", input="Tell me about llamas", instructions="Be terse.", temperature=0.2,
        previous_response_id="resp_earlier", extra_body={"vendor_field": {"x": [1, 2]}})
    response = raw.parse()
    sent = upstream.requests_to("/v1/responses")[-1].json
    assert sent == {"model": "fake-model", "input": default_rewrite("Tell me about llamas"),
                    "instructions": "Be terse.", "temperature": 0.2, "previous_response_id": "resp_earlier",
                    "vendor_field": {"x": [1, 2]}}
    assert response.output_text == "echo: " + default_rewrite("Tell me about llamas")
    assert raw.headers["x-bpo-applied"] == "true" and raw.headers["x-bpo-cache"] == "miss"
    assert raw.headers["x-bpo-optimizer"].startswith("remote:") and raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-bpo-overhead-ms"]) >= 0


def test_the_last_user_item_is_one_prompt_and_other_items_stay(upstream: FakeUpstream,
                                                               client: openai.OpenAI) -> None:
    items: list[Any] = [
        {"role": "user", "content": "Earlier question"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque=="},
        {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a photo"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Describe the chart"}, IMAGE,
            {"type": "input_file", "file_id": "file_1"}, {"type": "input_text", "text": "Be brief."}]},
    ]
    client.responses.create(model="fake-model", input=items)
    sent = upstream.requests_to("/v1/responses")[-1].json["input"]
    assert sent[:4] == items[:4]
    assert sent[4] == {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": default_rewrite("Describe the chart\nBe brief.")}, IMAGE,
        {"type": "input_file", "file_id": "file_1"}]}
    assert len(upstream.requests_to("/v1/completions")) == 1  # the whole turn: one optimizer call


def test_a_turn_ending_in_a_tool_output_is_forwarded_byte_for_byte(upstream: FakeUpstream,
                                                                   proxy: RunningProxy) -> None:
    body = {"model": "fake-model", "previous_response_id": "resp_1",
            "input": [{"type": "function_call_output", "call_id": "call_1", "output": "21C"}]}
    raw = json.dumps(body, indent=1).encode()
    response = httpx.post(proxy.base_url + "/responses", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.headers["x-bpo-reason"] == "not-user-turn"
    assert upstream.requests_to("/v1/responses")[-1].body == raw
    assert upstream.requests_to("/v1/completions") == []


def test_streams_are_relayed_as_sent(upstream: FakeUpstream, proxy: RunningProxy) -> None:
    body = {"model": "fake-model", "stream": True, "input": "Count to five"}

    def streamed(x_bpo: str) -> tuple[bytes, httpx.Headers]:
        with httpx.stream("POST", proxy.base_url + "/responses", json=body, headers={"x-bpo": x_bpo},
                          timeout=30) as response:
            return b"".join(response.iter_raw()), response.headers

    plain, plain_headers = streamed("off")
    rewritten, headers = streamed("on")
    assert plain_headers["x-bpo-applied"] == "false" and headers["x-bpo-applied"] == "true"
    assert headers["content-type"].startswith("text/event-stream")
    # What the provider sent for each request, byte for byte.
    assert plain == b"".join(responses_reply(body).sse or [])
    assert rewritten == b"".join(responses_reply({**body, "input": default_rewrite("Count to five")}).sse or [])
    assert b"event: response.completed" in rewritten


def test_sdk_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="fake-model", input=[{"role": "user", "content": "Say hi"}]) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas).strip() == "echo: " + default_rewrite("Say hi")
    assert final.output_text == "echo: " + default_rewrite("Say hi")


def test_other_responses_calls_pass_through(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    client.responses.retrieve("resp_123")
    client.responses.delete("resp_123")
    assert [(r.method, r.path) for r in upstream.requests if r.path.startswith("/v1/responses")] == [
        ("GET", "/v1/responses/resp_123"), ("DELETE", "/v1/responses/resp_123")]


def test_json_schema_output_is_not_rewritten(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    schema = {"type": "json_schema", "name": "r", "schema": {"type": "object", "properties": {}}}
    raw = client.responses.with_raw_response.create(model="fake-model", input="List rivers",
                                                    text={"format": schema})  # type: ignore[typeddict-item]
    assert raw.headers["x-bpo-applied"] == "false" and raw.headers["x-bpo-reason"] == "json-schema"
    assert upstream.requests_to("/v1/responses")[-1].json["input"] == "List rivers"


def test_bad_requests_are_400_in_openai_shape(proxy: RunningProxy) -> None:
    for body in ({"input": "hi"}, {"model": "fake-model", "input": 3},
                 {"model": "fake-model", "input": [{"role": "user", "content": [{"type": "input_text"}]}]}):
        response = httpx.post(proxy.base_url + "/responses", json=body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_metrics_count_the_route(client: openai.OpenAI, proxy: RunningProxy) -> None:
    client.responses.create(model="fake-model", input="Name a lake")
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'bpo_requests_total{applied="true",arm="none",reason="",route="responses"} 1.0' in metrics
    assert 'bpo_upstream_tokens_total{arm="none",kind="prompt"} 11.0' in metrics
