"""End to end: rewrites the optimizer could not finish — cut at their token limit — never reach the model."""

from __future__ import annotations

import openai

from tests.fakes.upstream import FakeUpstream, Recorded, Reply, completion_reply

from .conftest import StartProxy

LONG_PROMPT = ("Jason led the Argonauts to Colchis for the golden fleece, helped by Medea. " * 20
               + "Which poet wrote the Argonautica, and when?")


def cut_at_the_limit(recorded: Recorded) -> Reply:
    """The optimizer server ran out of tokens before the question at the end of the prompt."""
    reply = completion_reply(recorded.json, lambda prompt: prompt[: len(prompt) * 2 // 3])
    reply.json["choices"][0]["finish_reason"] = "length"
    return reply


def test_a_truncated_rewrite_is_not_forwarded(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    upstream.responders["/v1/completions"] = cut_at_the_limit
    proxy = start_proxy()
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    for cache in ("miss", "hit"):  # the verdict is cached like a guard rejection
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": LONG_PROMPT}])
        assert raw.headers["x-bpo-applied"] == "false"
        assert raw.headers["x-bpo-reason"] == "truncated"
        assert raw.headers["x-bpo-cache"] == cache
        assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][0]["content"] == LONG_PROMPT
    assert len(upstream.requests_to("/v1/completions")) == 1
