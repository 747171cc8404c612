"""Shadow judging end to end, on every rewriting route: the gateway asks the fake provider for control answers
and a second fake provider, through litellm's ``openai/`` route, for verdicts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.report import load_events, summarize
from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import (
    FakeUpstream,
    Recorded,
    Reply,
    chat_reply,
    default_rewrite,
    last_user_blocks_text,
    messages_reply,
    newest_input_text,
    responses_reply,
)

from .conftest import StartProxy

PROMPT = "How do tides work?"
TREATMENT_MARK = "step by step"  # the fake optimizer adds it, so only the treatment answer echoes it


def answers_in(judge_request: Recorded) -> tuple[str, str]:
    prompt = judge_request.json["messages"][-1]["content"]
    answer_a = prompt.split("[ANSWER A]\n", 1)[1].split("\n[/ANSWER A]", 1)[0]
    answer_b = prompt.split("[ANSWER B]\n", 1)[1].split("\n[/ANSWER B]", 1)[0]
    return answer_a, answer_b


def prefers_treatment(request: Recorded) -> Reply:
    answer_a, _ = answers_in(request)
    verdict = "[[A]]" if TREATMENT_MARK in answer_a else "[[B]]"
    return chat_reply(request.json, f"The better answer explains more. {verdict}")


@pytest.fixture(scope="module")
def judge_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream(models=("judge-model",)).start()
    yield server
    server.stop()


@pytest.fixture
def judge(judge_server: FakeUpstream) -> Iterator[FakeUpstream]:
    judge_server.clear()
    judge_server.responders["/v1/chat/completions"] = prefers_treatment
    yield judge_server
    judge_server.clear()


@pytest.fixture
def shadow_proxy(start_proxy: StartProxy, judge: FakeUpstream, tmp_path: Path) -> RunningProxy:
    return start_proxy(shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url, shadow_rate=1.0,
                       events=f"jsonl:{tmp_path / 'events.jsonl'}")


def sdk(proxy: RunningProxy) -> openai.OpenAI:
    # A response the shadow judge delayed would hit this timeout and fail the test.
    return openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=15)


def verdict_counts(proxy: RunningProxy) -> dict[str, float]:
    text = httpx.get(proxy.url + "/metrics").text
    return {s.labels["verdict"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "bpo_shadow_verdicts_total"}


def wait_for(condition: Callable[[], Any], timeout: float = 180.0) -> Any:
    """Poll until ``condition`` is truthy (an ordering aid for background work, not a timing assertion).

    Generous: the first judgement waits for litellm's import, which took over 30 s on a loaded 2-core machine.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.02)
    return value


def control_requests(upstream: FakeUpstream) -> list[dict[str, Any]]:
    chats = [r.json for r in upstream.requests_to("/v1/chat/completions")]
    return [body for body in chats if body["messages"][-1]["content"] == PROMPT]


def test_a_treatment_answer_is_judged_against_control_in_both_orders(
        upstream: FakeUpstream, judge: FakeUpstream, shadow_proxy: RunningProxy, tmp_path: Path) -> None:
    raw = sdk(shadow_proxy).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}], temperature=0.4)
    assert raw.headers["x-bpo-applied"] == "true"
    request_id = raw.headers["x-request-id"]
    assert wait_for(lambda: verdict_counts(shadow_proxy).get("win")) == 1

    treatment = "echo: " + default_rewrite(PROMPT)
    control = "echo: " + PROMPT
    (control_request,) = control_requests(upstream)  # the original prompt, asked once more
    assert control_request == {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}],
                               "temperature": 0.4}
    judged = judge.requests_to("/v1/chat/completions")
    assert sorted(answers_in(r) for r in judged) == sorted([(treatment, control), (control, treatment)])
    assert {r.json["model"] for r in judged} == {"judge-model"}

    shadow_proxy.stop()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    (shadow,) = [e for e in events if e["type"] == "shadow"]
    assert (shadow["request_id"], shadow["verdict"], shadow["judge_model"]) == (request_id, "win", "judge-model")
    assert "control_answer" not in shadow
    report = summarize(load_events(str(tmp_path / "events.jsonl")), "events")
    assert report.shadow.counts == {"win": 1, "tie": 0, "loss": 0}


def test_a_verdict_that_flips_with_the_order_is_a_tie(judge: FakeUpstream, shadow_proxy: RunningProxy) -> None:
    judge.responders["/v1/chat/completions"] = lambda r: chat_reply(r.json, "The first one. [[A]]")
    sdk(shadow_proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": PROMPT}])
    assert wait_for(lambda: verdict_counts(shadow_proxy).get("tie")) == 1
    assert len(judge.requests_to("/v1/chat/completions")) == 2


def test_a_streamed_treatment_answer_is_judged_from_the_bytes_that_passed(
        judge: FakeUpstream, shadow_proxy: RunningProxy) -> None:
    stream = sdk(shadow_proxy).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}], stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert wait_for(lambda: verdict_counts(shadow_proxy).get("win")) == 1
    judged_answers = {a for r in judge.requests_to("/v1/chat/completions") for a in answers_in(r)}
    assert streamed.strip() in judged_answers and TREATMENT_MARK in streamed  # the judge prompt strips answers


def test_a_slow_judge_never_delays_the_users_response(judge: FakeUpstream, shadow_proxy: RunningProxy) -> None:
    release = threading.Event()

    def stalled_judge(request: Recorded) -> Reply:
        release.wait(timeout=30)  # holds the judge's server until the test lets go
        return prefers_treatment(request)

    judge.responders["/v1/chat/completions"] = stalled_judge
    try:
        completion = sdk(shadow_proxy).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": PROMPT}])
        assert completion.choices[0].message.content == "echo: " + default_rewrite(PROMPT)
        wait_for(lambda: judge.requests_to("/v1/chat/completions"))  # the judge is now stuck on it
        assert verdict_counts(shadow_proxy) == {}  # answered while the judgement was still pending
        again = sdk(shadow_proxy).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Another question"}])
        assert (again.choices[0].message.content or "").startswith("echo: ")
    finally:
        release.set()
    assert wait_for(lambda: verdict_counts(shadow_proxy).get("win")) == 2


def test_control_and_override_requests_are_never_judged(
        upstream: FakeUpstream, judge: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url, shadow_rate=1.0,
                        ab_treatment_percent=50)
    client = sdk(proxy)

    def ask(user: str, headers: dict[str, str] | None = None) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": PROMPT}], user=user,
            extra_headers=headers or {})

    arms = {user: ask(user, {"X-BPO": "off"}).headers for user in [f"s-{i}" for i in range(12)]}
    assert all(h["x-bpo-applied"] == "false" for h in arms.values())  # overrides: never judged
    for user in arms:
        ask(user)  # half control (never judged), half treatment (judged)
    treated = sum(ask(user, {"X-BPO": "on"}).headers["x-bpo-arm"] == "treatment" for user in arms)
    assert treated == len(arms)  # overrides again, never judged
    expected = sum(1 for user in arms if ask(user, {"X-BPO-Debug": "1"}).headers["x-bpo-arm"] == "treatment")
    wait_for(lambda: sum(verdict_counts(proxy).values()) >= 2 * expected)
    assert verdict_counts(proxy) == {"win": 2 * expected}
    assert len(judge.requests_to("/v1/chat/completions")) == 4 * expected


def test_a_client_that_leaves_a_judged_stream_still_cancels_the_upstream(
        upstream: FakeUpstream, judge: FakeUpstream, shadow_proxy: RunningProxy) -> None:
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        sse=[b'data: {"choices": [{"index": 0, "delta": {"content": "w "}}]}\n\n'] * 200, chunk_delay=0.05)
    before = upstream.disconnects
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    with httpx.stream("POST", shadow_proxy.base_url + "/chat/completions", json=body, timeout=10) as response:
        assert response.headers["x-bpo-applied"] == "true"
        assert next(response.iter_raw()).startswith(b"data: ")
    wait_for(lambda: upstream.disconnects > before)

    def skipped() -> float:
        text = httpx.get(shadow_proxy.url + "/metrics").text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == "bpo_shadow_skipped_total" and s.labels == {"reason": "incomplete"})

    assert wait_for(skipped) == 1
    assert judge.requests_to("/v1/chat/completions") == []  # half an answer is never judged


@pytest.mark.parametrize(("judge_key", "expected"), [(None, "Bearer EMPTY"), ("sk-judge", "Bearer sk-judge")])
def test_the_judge_gets_its_own_key_never_the_upstreams(
        upstream: FakeUpstream, judge: FakeUpstream, start_proxy: StartProxy, judge_key: str | None,
        expected: str) -> None:
    proxy = start_proxy(shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url, shadow_rate=1.0,
                        shadow_judge_api_key=judge_key, upstream_api_key="sk-upstream")
    sdk(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": PROMPT}])
    wait_for(lambda: verdict_counts(proxy).get("win"))
    assert {r.headers["authorization"] for r in judge.requests_to("/v1/chat/completions")} == {expected}
    (control,) = [r for r in upstream.requests_to("/v1/chat/completions")
                  if r.json["messages"][-1]["content"] == PROMPT]
    assert control.headers["authorization"] == "Bearer sk-upstream"  # the control call is an upstream call


def samples(proxy: RunningProxy, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(proxy.url + "/metrics").text
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_an_odd_200_body_reaches_the_client_unchanged_while_shadow_judging(
        upstream: FakeUpstream, judge: FakeUpstream, shadow_proxy: RunningProxy) -> None:
    odd = b'{"choices": [1]}'
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(
        raw=odd, headers={"content-type": "application/json"})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}]}
    response = httpx.post(shadow_proxy.base_url + "/chat/completions", json=body, timeout=15)
    assert (response.status_code, response.content) == (200, odd)
    assert response.headers["x-bpo-applied"] == "true"  # a treatment request, so it was sampled for judging
    assert samples(shadow_proxy, "bpo_shadow_skipped_total") == {(("reason", "no-answer"),): 1}
    assert samples(shadow_proxy, "bpo_fail_open_total").get((("component", "shadow"),), 0) == 0
    assert judge.requests_to("/v1/chat/completions") == []


# -- the Responses and Messages routes -----------------------------------------------------------------

SYSTEM = "Be brief."
# The request each route's client sends (its stream flag aside): the control call must replay exactly this.
ORIGINALS: dict[str, dict[str, Any]] = {
    "responses": {"model": "fake-model", "instructions": SYSTEM, "input": PROMPT, "temperature": 0.4},
    "messages": {"model": "claude-fake", "max_tokens": 64, "system": SYSTEM,
                 "messages": [{"role": "user", "content": PROMPT}]},
}
PATHS = {"responses": "/v1/responses", "messages": "/v1/messages"}
NEWEST_TEXT = {"responses": newest_input_text, "messages": last_user_blocks_text}
REPLIES = {"responses": responses_reply, "messages": messages_reply}
ANTHROPIC_BETA = "prompt-caching-2024-07-31"


@pytest.fixture
def shapes_proxy(start_proxy: StartProxy, upstream: FakeUpstream, judge: FakeUpstream,
                 tmp_path: Path) -> RunningProxy:
    return start_proxy(shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url, shadow_rate=1.0,
                       anthropic_base_url=upstream.base_url, events=f"jsonl:{tmp_path / 'events.jsonl'}")


def ask(proxy: RunningProxy, route: str, stream: bool) -> tuple[httpx.Headers, str]:
    """One request through the route's official SDK: the response headers and the answer text it read."""
    if route == "responses":
        raw = sdk(proxy).responses.with_raw_response.create(**ORIGINALS[route], stream=stream)
        if stream:
            return raw.headers, "".join(e.delta for e in raw.parse() if e.type == "response.output_text.delta")
        return raw.headers, raw.parse().output_text
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0, timeout=15)
    message = claude.messages.with_raw_response.create(**ORIGINALS[route], stream=stream,
                                                       extra_headers={"anthropic-beta": ANTHROPIC_BETA})
    if stream:
        return message.headers, "".join(e.delta.text for e in message.parse()
                                        if e.type == "content_block_delta" and e.delta.type == "text_delta")
    return message.headers, "".join(block.text for block in message.parse().content if block.type == "text")


def sent_to(upstream: FakeUpstream, route: str) -> tuple[list[Recorded], list[Recorded]]:
    """The route's requests upstream: (treatment, control), told apart by the newest user text."""
    sent = upstream.requests_to(PATHS[route])
    original = [r for r in sent if NEWEST_TEXT[route](r.json) == PROMPT]
    return [r for r in sent if r not in original], original


def without_length(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name != "content-length"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", ["responses", "messages"])
def test_every_route_is_judged_against_its_original_replayed_on_the_same_path(
        route: str, stream: bool, upstream: FakeUpstream, judge: FakeUpstream, shapes_proxy: RunningProxy,
        tmp_path: Path) -> None:
    headers, answer = ask(shapes_proxy, route, stream)
    assert headers["x-bpo-applied"] == "true" and answer.strip() == "echo: " + default_rewrite(PROMPT)
    assert wait_for(lambda: verdict_counts(shapes_proxy).get("win")) == 1

    (treatment,), (control,) = sent_to(upstream, route)
    assert control.json == ORIGINALS[route]  # the original prompt, asked once more for one plain answer
    assert bool(treatment.json.get("stream")) is stream
    # The client's headers, as its own request carried them: its key, anthropic-version and -beta.
    assert without_length(control.headers) == without_length(treatment.headers)
    if route == "messages":
        key = control.headers.get("x-api-key") or control.headers["authorization"].removeprefix("Bearer ")
        assert key == "sk-ant-client"  # the SDK sends x-api-key or a bearer token
        assert control.headers["anthropic-version"] and control.headers["anthropic-beta"] == ANTHROPIC_BETA
    else:
        assert control.headers["authorization"] == "Bearer sk-client"
    treatment_answer, control_answer = "echo: " + default_rewrite(PROMPT), "echo: " + PROMPT
    judged = judge.requests_to("/v1/chat/completions")
    assert sorted(answers_in(r) for r in judged) == sorted([(treatment_answer, control_answer),
                                                            (control_answer, treatment_answer)])

    shadow_proxy_events = tmp_path / "events.jsonl"
    shapes_proxy.stop()
    events = [json.loads(line) for line in shadow_proxy_events.read_text().splitlines()]
    (shadow,) = [e for e in events if e["type"] == "shadow"]
    (request,) = [e for e in events if e["type"] == "request"]
    assert (shadow["request_id"], shadow["route"], shadow["verdict"]) == (headers["x-request-id"], route, "win")
    assert (request["request_id"], request["route"]) == (shadow["request_id"], route)
    report = summarize(load_events(str(shadow_proxy_events)), "events")
    assert report.shadow.counts == {"win": 1, "tie": 0, "loss": 0}


def tool_only(route: str) -> Reply:
    """An answer with no text: a function call (Responses), a tool_use block (Messages)."""
    if route == "responses":
        return Reply(json={"id": "resp_tool", "object": "response", "status": "completed", "output": [
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}]})
    return Reply(json={"id": "msg_tool", "type": "message", "role": "assistant", "stop_reason": "tool_use",
                       "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}]})


BROKEN_CONTROLS: dict[str, Callable[[str], Reply]] = {
    "status-500": lambda route: Reply(status=500, json={"error": {"message": "the provider is down"}}),
    "tool-only": tool_only,
    "not-json": lambda route: Reply(raw=b"<html>bad gateway</html>", headers={"content-type": "text/html"}),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_CONTROLS))
@pytest.mark.parametrize("route", ["responses", "messages"])
def test_a_broken_control_answer_is_an_error_verdict_and_never_reaches_the_client(
        route: str, broken: str, upstream: FakeUpstream, judge: FakeUpstream, shapes_proxy: RunningProxy,
        tmp_path: Path) -> None:
    def control_breaks(request: Recorded) -> Reply:
        if NEWEST_TEXT[route](request.json) == PROMPT:
            return BROKEN_CONTROLS[broken](route)
        return REPLIES[route](request.json)

    upstream.responders[PATHS[route]] = control_breaks
    headers, answer = ask(shapes_proxy, route, stream=False)
    assert headers["x-bpo-applied"] == "true" and answer == "echo: " + default_rewrite(PROMPT)
    assert wait_for(lambda: verdict_counts(shapes_proxy).get("error")) == 1
    assert len(sent_to(upstream, route)[1]) == 1  # the control call was made, and failed
    assert judge.requests_to("/v1/chat/completions") == []
    assert samples(shapes_proxy, "bpo_fail_open_total").get((("component", "shadow"),), 0) == 0
    shapes_proxy.stop()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    (shadow,) = [e for e in events if e["type"] == "shadow"]
    assert (shadow["route"], shadow["verdict"], shadow["error"]) == (route, "error", "ShadowError")


def test_a_control_answer_streamed_unasked_is_still_read(
        upstream: FakeUpstream, judge: FakeUpstream, shapes_proxy: RunningProxy) -> None:
    def control_streams(request: Recorded) -> Reply:
        streams = NEWEST_TEXT["responses"](request.json) == PROMPT
        return responses_reply({**request.json, "stream": streams})

    upstream.responders["/v1/responses"] = control_streams
    _, answer = ask(shapes_proxy, "responses", stream=False)
    assert answer == "echo: " + default_rewrite(PROMPT)
    assert wait_for(lambda: verdict_counts(shapes_proxy).get("win")) == 1
    (control,) = sent_to(upstream, "responses")[1]
    assert "stream" not in control.json


def test_the_control_call_of_a_litellm_route_goes_through_litellm_like_the_clients(
        upstream: FakeUpstream, judge: FakeUpstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "claude", "litellm_params": {
        "model": "anthropic/claude-fake", "api_base": upstream.base_url.removesuffix("/v1"),
        "api_key": "sk-ant-route"}}]}))
    proxy = start_proxy(config=str(config), shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url,
                        shadow_rate=1.0)
    raw = sdk(proxy).responses.with_raw_response.create(model="claude", input=PROMPT, max_output_tokens=32)
    assert raw.headers["x-bpo-applied"] == "true"
    assert wait_for(lambda: verdict_counts(proxy).get("win")) == 1
    # Both went through litellm.aresponses, which spoke Anthropic's API with the route's key.
    treatment, control = sent_to(upstream, "messages")
    assert len(treatment) == len(control) == 1 and control[0].headers["x-api-key"] == "sk-ant-route"
    assert upstream.requests_to("/v1/responses") == []
