"""Conversations stay consistent: earlier rewritten turns are replayed from the cache on every shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, default_rewrite

from .conftest import StartProxy

TURNS = ("Plan a trip to Rome", "Add a day in Florence", "Make it cheaper")
# One turn: the conversation so far (original texts) -> the upstream's view of its items, and the headers.
Send = Callable[[RunningProxy, list[dict[str, Any]]], tuple[list[Any], dict[str, str], str]]


def send_chat(proxy: RunningProxy, history: list[dict[str, Any]]) -> tuple[list[Any], dict[str, str], str]:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=history)  # type: ignore[arg-type]
    return [m["content"] for m in history], dict(raw.headers), raw.parse().choices[0].message.content or ""


def send_responses(proxy: RunningProxy, history: list[dict[str, Any]]) -> tuple[list[Any], dict[str, str], str]:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    items = [{"role": m["role"], "content": [{"type": "input_text" if m["role"] == "user" else "output_text",
                                              "text": m["content"]}]} for m in history]
    raw = client.responses.with_raw_response.create(model="fake-model", input=items)  # type: ignore[arg-type]
    return [m["content"] for m in history], dict(raw.headers), raw.parse().output_text


def send_messages(proxy: RunningProxy, history: list[dict[str, Any]]) -> tuple[list[Any], dict[str, str], str]:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0)
    raw = client.messages.with_raw_response.create(model="claude-fake", max_tokens=64,
                                                   messages=history)  # type: ignore[arg-type]
    return [m["content"] for m in history], dict(raw.headers), raw.parse().content[0].text  # type: ignore[union-attr]


def upstream_texts(upstream: FakeUpstream, route: str) -> list[str]:
    """The texts of the conversation's items as the provider received them, in order."""
    path, field = {"chat": ("/v1/chat/completions", "messages"), "responses": ("/v1/responses", "input"),
                   "messages": ("/v1/messages", "messages")}[route]
    items = upstream.requests_to(path)[-1].json[field]
    return [item["content"] if isinstance(item["content"], str) else item["content"][0]["text"] for item in items]


SHAPES: dict[str, Send] = {"chat": send_chat, "responses": send_responses, "messages": send_messages}


def converse(proxy: RunningProxy, send: Send, turns: tuple[str, ...]) -> list[dict[str, str]]:
    history: list[dict[str, Any]] = []
    headers = []
    for text in turns:
        history.append({"role": "user", "content": text})
        _, answer_headers, answer = send(proxy, history)
        headers.append(answer_headers)
        history.append({"role": "assistant", "content": answer.strip()})
    return headers


@pytest.mark.parametrize("route", list(SHAPES))
def test_three_turns_replay_the_earlier_rewrites_with_one_optimizer_call_per_turn(
        route: str, upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(anthropic_base_url=upstream.base_url)
    calls = []
    history: list[dict[str, Any]] = []
    for number, text in enumerate(TURNS):
        history.append({"role": "user", "content": text})
        _, headers, answer = SHAPES[route](proxy, history)
        calls.append(len(upstream.requests_to("/v1/completions")))
        seen = upstream_texts(upstream, route)
        # The provider sees every user turn as its rewrite: the conversation it answered.
        assert seen[0::2] == [default_rewrite(t) for t in TURNS[:number + 1]]
        assert headers["x-bpo-applied"] == "true"
        assert headers.get("x-bpo-history-replayed", "0") == str(number)
        history.append({"role": "assistant", "content": answer.strip()})
    assert calls == [1, 2, 3]  # exactly one optimizer call per new turn, none for history


def test_history_replay_off_sends_earlier_turns_as_written(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(rewrite_history="off")
    headers = converse(proxy, send_chat, TURNS[:2])
    assert upstream_texts(upstream, "chat")[0::2] == [TURNS[0], default_rewrite(TURNS[1])]
    assert "x-bpo-history-replayed" not in headers[1]


def test_turns_without_a_cached_rewrite_stay_and_x_bpo_off_replays_nothing(upstream: FakeUpstream,
                                                                          start_proxy: StartProxy) -> None:
    proxy = start_proxy()
    history = [{"role": "user", "content": "Never seen before"}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "Plan a trip to Rome"}]
    _, headers, _ = send_chat(proxy, history)
    assert upstream_texts(upstream, "chat")[0] == "Never seen before" and "x-bpo-history-replayed" not in headers
    history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Thanks"}]
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="fake-model", messages=history,  # type: ignore[arg-type]
                                   extra_headers={"X-BPO": "off"})
    assert upstream_texts(upstream, "chat")[2] == "Plan a trip to Rome"  # the control experience: as written
