"""A guard rejection is traceable: its rule and request id in a log line and the event, the refused rewrite
in X-BPO-Debug's headers and (only with --events-include-text) in the event; the original goes upstream."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import openai
import pytest

from tests.fakes.upstream import FakeUpstream, completion_reply

from .conftest import StartProxy

PROMPT = "Which rivers flow into the Caspian Sea?"
# What the untrained base model wrote back: the optimizer's own instruction.
ECHO = ("You're an expert prompt engineer. Please help me improve this prompt to get a more helpful and "
        "harmless response.")


def echoing_optimizer(upstream: FakeUpstream) -> None:
    upstream.responders["/v1/completions"] = lambda r: completion_reply(r.json, rewrite=lambda p: ECHO)


def ask(base_url: str, debug: bool) -> Any:
    client = openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=0, timeout=15)
    return client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}],
        extra_headers={"X-BPO-Debug": "1"} if debug else {})


def request_event(path: Path, request_id: str) -> dict[str, Any]:
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    (event,) = [e for e in events if e["type"] == "request" and e["request_id"] == request_id]
    return dict(event)


def test_rejection_names_its_rule_in_headers_log_and_event_but_no_text(
        start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    echoing_optimizer(upstream)
    path = tmp_path / "events.jsonl"
    proxy = start_proxy(events=f"jsonl:{path}")
    with caplog.at_level(logging.INFO, logger="bpo.serving"):
        debugged, plain = ask(proxy.base_url, debug=True), ask(proxy.base_url, debug=False)
        proxy.stop()
    for raw in (debugged, plain):
        assert (raw.headers["x-bpo-applied"], raw.headers["x-bpo-reason"]) == ("false", "guard-rejected")
    assert debugged.headers["x-bpo-guard-rule"] == "template-echo"
    assert unquote(debugged.headers["x-bpo-optimized-prompt"]) == ECHO
    assert "x-bpo-guard-rule" not in plain.headers and "x-bpo-optimized-prompt" not in plain.headers
    sent = [r.json["messages"][0]["content"] for r in upstream.requests_to("/v1/chat/completions")]
    assert sent == [PROMPT, PROMPT]

    request_id = debugged.headers["x-request-id"]
    event = request_event(path, request_id)
    assert event["guard_rule"] == "template-echo" and event["reason"] == "guard-rejected"
    assert "rejected_prompt" not in event and "expert prompt engineer" not in path.read_text(encoding="utf-8")
    lines = [record.getMessage() for record in caplog.records if record.name == "bpo.serving"]
    assert f"guard rejected a rewrite: request_id={request_id} rule=template-echo" in lines
    assert not any("Caspian" in line or "expert prompt" in line for line in lines)


def test_include_text_puts_the_refused_rewrite_in_the_event(
        start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    echoing_optimizer(upstream)
    path = tmp_path / "events.jsonl"
    proxy = start_proxy(events=f"jsonl:{path}", events_include_text=True)
    raw = ask(proxy.base_url, debug=False)
    proxy.stop()
    event = request_event(path, raw.headers["x-request-id"])
    assert (event["prompt"], event["optimized_prompt"], event["rejected_prompt"]) == (PROMPT, None, ECHO)
    assert event["guard_rule"] == "template-echo"
