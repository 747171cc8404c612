"""End to end: a user turn of many text parts is one prompt — one optimizer call, one length budget."""

from __future__ import annotations

import httpx
import openai

from tests.fakes.upstream import FakeUpstream, default_rewrite

from .conftest import StartProxy


def test_text_parts_are_rewritten_in_one_call_into_the_first_part(upstream: FakeUpstream,
                                                                  client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/chart.png", "detail": "low"}}
    content = [{"type": "text", "text": "Describe the chart"}, image, {"type": "text", "text": "Be brief."}]
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": content}])  # type: ignore[list-item]
    assert raw.headers["x-bpo-applied"] == "true"
    assert len(upstream.requests_to("/v1/completions")) == 1
    sent = upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"]
    assert sent == [{"type": "text", "text": default_rewrite("Describe the chart\nBe brief.")}, image]


def test_the_whole_turn_counts_against_max_prompt_chars(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(max_prompt_chars=30)
    content = [{"type": "text", "text": "a" * 20}, {"type": "text", "text": "b" * 20}]
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    response = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert response.headers["x-bpo-reason"] == "too-long"
    assert upstream.requests_to("/v1/completions") == []
    assert upstream.requests_to("/v1/chat/completions")[-1].json == body


def test_twenty_thousand_parts_make_one_optimizer_call(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(max_prompt_chars=1_000_000)
    content = [{"type": "text", "text": f"part {i}"} for i in range(20_000)]
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    response = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=120)
    assert response.status_code == 200 and response.headers["x-bpo-applied"] == "true"
    assert len(upstream.requests_to("/v1/completions")) == 1
    sent = upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"]
    assert len(sent) == 1 and sent[0]["text"].startswith("part 0\npart 1\n")
