"""The events file end to end: ``--events-include-text`` decides whether prompt texts are ever written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import default_rewrite

from .conftest import StartProxy

PROMPT = "Which rivers flow into the Caspian Sea?"


def ask_and_stop(proxy: RunningProxy) -> str:
    """One chat completion; then stop the proxy, which flushes the events sink. Returns the request id."""
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=15)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-bpo-applied"] == "true"
    proxy.stop()
    return str(raw.headers["x-request-id"])


def request_event(path: Path, request_id: str) -> dict[str, Any]:
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    (event,) = [e for e in events if e["type"] == "request" and e["request_id"] == request_id]
    return dict(event)


def test_include_text_records_the_prompt_and_its_rewrite(start_proxy: StartProxy, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    request_id = ask_and_stop(start_proxy(events=f"jsonl:{path}", events_include_text=True))
    event = request_event(path, request_id)
    assert (event["prompt"], event["optimized_prompt"]) == (PROMPT, default_rewrite(PROMPT))
    assert event["applied"] is True


def test_without_include_text_no_prompt_text_reaches_the_events_file(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    request_id = ask_and_stop(start_proxy(events=f"jsonl:{path}"))
    event = request_event(path, request_id)
    assert "prompt" not in event and "optimized_prompt" not in event
    assert event["applied"] is True  # the request was rewritten; only the texts are left out
    assert "Caspian" not in path.read_text(encoding="utf-8")
