"""The llm: backend through litellm's openai/ provider, pointed at the fake upstream on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from optimizer.base import Optimizer, OptimizerError, OptimizerOptions, OptimizerUnavailable
from optimizer.llm import INSTRUCTION, LLMOptimizer, unwrap
from optimizer.registry import build_optimizer
from tests.fakes.upstream import FakeUpstream, Recorded, Reply, chat_reply

OPTIONS = OptimizerOptions(max_new_tokens=200, api_key="sk-test", request_timeout=5.0)


@pytest.fixture
async def llm(upstream: FakeUpstream) -> AsyncIterator[LLMOptimizer]:
    optimizer = LLMOptimizer("openai/bpo-fake", OPTIONS, api_base=upstream.base_url)
    await optimizer.start()
    assert (await optimizer.wait_loaded()).state == "ready"
    yield optimizer
    await optimizer.close()


def answer_with(upstream: FakeUpstream, content: str) -> None:
    upstream.responders["/v1/chat/completions"] = lambda r: chat_reply(r.json, content)


async def test_stable_rewrite_asks_the_chat_model_with_the_instruction(
    llm: LLMOptimizer, upstream: FakeUpstream
) -> None:
    answer_with(upstream, 'Improved prompt: "Explain what black holes are and how they form."')
    rewrite = await llm.optimize("Tell me about black holes.", "stable")
    assert rewrite.text == "Explain what black holes are and how they form."
    assert rewrite.optimizer == llm.identity and llm.identity.startswith("llm:openai/bpo-fake@i1-")
    (request,) = upstream.requests_to("/v1/chat/completions")
    body = request.json
    assert body["model"] == "bpo-fake"
    # The budget is sized from the prompt (6x, at least 128 tokens), under the 200-token cap.
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.9, 128)
    assert body["messages"][0] == {"role": "system", "content": INSTRUCTION}
    assert body["messages"][1]["content"].endswith("\nTell me about black holes.")
    assert request.headers["authorization"] == "Bearer sk-test"


async def test_aggressive_rewrite_is_hotter_and_one_line(llm: LLMOptimizer, upstream: FakeUpstream) -> None:
    answer_with(upstream, "Explain black holes in depth, with examples.\nAlso, here is why I changed it.")
    rewrite = await llm.optimize("Tell me about black holes.", "aggressive")
    assert rewrite.text == "Explain black holes in depth, with examples."
    body = upstream.requests_to("/v1/chat/completions")[0].json
    assert body["temperature"] == 0.9 and "single line" in body["messages"][0]["content"]


async def test_provider_error_becomes_optimizer_error(llm: LLMOptimizer, upstream: FakeUpstream) -> None:
    upstream.responders["/v1/chat/completions"] = lambda r: Reply(status=500, json={"error": {"message": "down"}})
    with pytest.raises(OptimizerError, match="llm:openai/bpo-fake failed"):
        await llm.optimize("hi", "stable")


async def test_unavailable_until_litellm_is_imported() -> None:
    optimizer = build_optimizer("llm:openai/bpo-fake", replace(OPTIONS, seed=3))
    assert isinstance(optimizer, LLMOptimizer) and isinstance(optimizer, Optimizer)
    assert optimizer.status().state == "loading"
    with pytest.raises(OptimizerUnavailable):
        await optimizer.optimize("hi", "stable")
    await optimizer.close()


@pytest.mark.parametrize(
    ("answer", "prompt"),
    [
        ("Improved prompt: Explain X.", "Explain X."),
        ('Here is the improved prompt:\n"Explain X."', "Explain X."),
        ("“Explain X.”", "Explain X."),
        ('"Yes" or "no": is X true?', '"Yes" or "no": is X true?'),
        ("Rewritten prompt: List 3 facts about `ls -l`.", "List 3 facts about `ls -l`."),
    ],
)
def test_unwrap_keeps_the_prompt_only(answer: str, prompt: str) -> None:
    assert unwrap(answer) == prompt


async def test_an_answer_cut_at_max_tokens_is_marked_truncated(llm: LLMOptimizer, upstream: FakeUpstream) -> None:
    def cut(recorded: Recorded) -> Reply:
        reply = chat_reply(recorded.json, "Explain what black holes are and how")
        reply.json["choices"][0]["finish_reason"] = "length"
        return reply

    upstream.responders["/v1/chat/completions"] = cut
    assert (await llm.optimize("Tell me about black holes.", "stable")).truncated
    answer_with(upstream, "Explain what black holes are.")
    assert not (await llm.optimize("Tell me about black holes.", "stable")).truncated


async def test_each_calls_usage_is_reported_for_billing(upstream: FakeUpstream) -> None:
    reported: list[tuple[str, dict[str, int]]] = []
    options = replace(OPTIONS, on_usage=lambda model, usage: reported.append((model, dict(usage))))
    optimizer = LLMOptimizer("openai/bpo-fake", options, api_base=upstream.base_url)
    await optimizer.start()
    assert (await optimizer.wait_loaded()).state == "ready"
    answer_with(upstream, "Explain what black holes are.")
    await optimizer.optimize("Tell me about black holes.", "stable")
    await optimizer.close()
    [(model, usage)] = reported
    assert model == "openai/bpo-fake"
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (11, 5)  # the fake provider's usage
