"""The remote: backend against the fake upstream's /v1/models and /v1/completions over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest

from optimizer.base import Optimizer, OptimizerError, OptimizerOptions, OptimizerUnavailable
from optimizer.budget import MIN_BUDGET_TOKENS
from optimizer.identity import remote_identity
from optimizer.registry import build_optimizer
from optimizer.remote import RemoteOptimizer, normalize_base_url, rejects_extras
from optimizer.template import BANNED_STRINGS, build_prompt
from tests.fakes.upstream import FakeUpstream, Recorded, Reply, completion_reply, free_port

OPTIONS = OptimizerOptions(max_new_tokens=128, remote_model="bpo-fake", request_timeout=2.0)


async def started(base_url: str, options: OptimizerOptions = OPTIONS, **kwargs: float) -> RemoteOptimizer:
    optimizer = RemoteOptimizer(base_url, options, **kwargs)
    await optimizer.start()
    await until(lambda: optimizer.status().state != "loading")
    return optimizer


@pytest.fixture
async def remote(upstream: FakeUpstream) -> AsyncIterator[RemoteOptimizer]:
    optimizer = await started(upstream.base_url)
    yield optimizer
    await optimizer.close()


def completion_bodies(upstream: FakeUpstream) -> list[dict[str, object]]:
    return [r.json for r in upstream.requests_to("/v1/completions")]


def serve_models(upstream: FakeUpstream, *cards: dict[str, object]) -> None:
    upstream.responders["/v1/models"] = lambda r: Reply(json={"object": "list", "data": list(cards)})


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Yield to the loop until ``condition`` holds (an ordering aid, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


def test_base_url_accepts_server_root_or_v1() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"


def test_registry_builds_remote_backend(upstream: FakeUpstream) -> None:
    optimizer = build_optimizer(f"remote:{upstream.base_url}", OPTIONS)
    assert isinstance(optimizer, RemoteOptimizer) and isinstance(optimizer, Optimizer)


async def test_stable_rewrite_sends_template_and_stable_decoding(
    remote: RemoteOptimizer, upstream: FakeUpstream
) -> None:
    assert remote.status().state == "ready"
    rewrite = await remote.optimize("Tell me about black holes.", "stable")
    assert (
        rewrite.text == "Tell me about black holes. Please answer in detail, step by step, and explain your reasoning."
    )
    assert rewrite.optimizer == remote.identity and remote.identity.startswith("remote:bpo-fake@")
    (body,) = completion_bodies(upstream)
    assert body["prompt"] == build_prompt("Tell me about black holes.")
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("bpo-fake", 0.6, 0.9, 128)
    assert "stop" not in body and "min_tokens" not in body and "seed" not in body


async def test_aggressive_rewrite_stops_at_newline_and_cleans_leaked_markers(upstream: FakeUpstream) -> None:
    upstream.responders["/v1/completions"] = lambda r: completion_reply(
        r.json, lambda prompt: "Explain black holes clearly [KEE\nsecond line"
    )
    optimizer = await started(upstream.base_url, replace(OPTIONS, seed=7))
    try:
        rewrite = await optimizer.optimize("Tell me about black holes please", "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.text == "Explain black holes clearly"
    (body,) = completion_bodies(upstream)
    assert (body["temperature"], body["top_p"], body["stop"], body["seed"]) == (0.9, 0.9, ["\n"], 7)
    # prompt tokens (estimated from 6 words, plus BOS as the reference counts it) + 5
    assert body["min_tokens"] == 14
    assert body["bad_words"] == list(BANNED_STRINGS)


async def test_model_discovered_from_v1_models_when_not_configured(upstream: FakeUpstream) -> None:
    upstream.responders["/v1/models"] = lambda r: Reply(
        json={
            "object": "list",
            "data": [{"id": "bpo", "object": "model", "root": "/models/bpo-v2", "owned_by": "vllm"}],
        }
    )
    optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model=None))
    try:
        await optimizer.optimize("hi there", "stable")
    finally:
        await optimizer.close()
    assert completion_bodies(upstream)[0]["model"] == "bpo"
    assert optimizer.identity.startswith("remote:bpo@")


async def test_identity_follows_the_served_model_root(upstream: FakeUpstream) -> None:
    identities = []
    for root in ("/models/bpo-v1", "/models/bpo-v2", "/models/bpo-v1"):
        serve_models(upstream, {"id": "bpo", "root": root})
        optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model=None))
        identities.append(optimizer.identity)
        await optimizer.close()
    assert identities[0] == identities[2] != identities[1]


async def test_versioned_served_name_is_the_identity(upstream: FakeUpstream) -> None:
    upstream.responders["/v1/models"] = lambda r: Reply(json={"data": [{"id": "bpo@v3"}]})
    optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model=None))
    await optimizer.close()
    assert optimizer.identity == "remote:bpo@v3"


async def test_identity_follows_a_new_root_even_when_no_request_saw_the_restart(upstream: FakeUpstream) -> None:
    serve_models(upstream, {"id": "bpo", "root": "/models/bpo-v1"})
    optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model=None), identity_refresh=0.05)
    try:
        before = (await optimizer.optimize("hi there", "stable")).optimizer
        new_card = {"id": "bpo", "root": "/models/bpo-v2", "created": 1800000000}
        serve_models(upstream, new_card)
        await asyncio.sleep(0.1)
        await optimizer.optimize("hi there", "stable")  # due: reads /v1/models again behind this rewrite
        await until(lambda: optimizer.identity != before)
        after = await optimizer.optimize("hi there", "stable")
    finally:
        await optimizer.close()
    assert before == remote_identity("bpo", {"root": "/models/bpo-v1"})
    assert after.optimizer == optimizer.identity == remote_identity("bpo", new_card) != before


async def test_a_404_finds_the_model_renamed_under_a_new_version(upstream: FakeUpstream) -> None:
    def serving_v2(recorded: Recorded) -> Reply:
        if recorded.json["model"] != "bpo@v2":
            return Reply(status=404, json={"error": {"message": "The model does not exist."}})
        return completion_reply(recorded.json)

    serve_models(upstream, {"id": "bpo@v1"})
    optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model=None))
    try:
        assert (await optimizer.optimize("hi there", "stable")).optimizer == "remote:bpo@v1"
        # The server restarts as bpo@v2 between two requests: no request sees it go down.
        serve_models(upstream, {"id": "bpo@v2"})
        upstream.responders["/v1/completions"] = serving_v2
        with pytest.raises(OptimizerError, match="404"):
            await optimizer.optimize("hi there", "stable")
        await until(lambda: optimizer.identity == "remote:bpo@v2")
        rewrite = await optimizer.optimize("hi there", "stable")
    finally:
        await optimizer.close()
    assert rewrite.optimizer == "remote:bpo@v2" and completion_bodies(upstream)[-1]["model"] == "bpo@v2"


async def test_a_404_for_the_configured_model_says_it_is_gone(upstream: FakeUpstream) -> None:
    serve_models(upstream, {"id": "bpo-fake"})
    optimizer = await started(upstream.base_url)
    try:
        serve_models(upstream, {"id": "bpo@v2"})
        upstream.responders["/v1/completions"] = lambda r: Reply(status=404, json={"error": {"message": "gone"}})
        with pytest.raises(OptimizerError, match="404"):
            await optimizer.optimize("hi there", "stable")
        await until(lambda: optimizer.status().state == "failed")
        status = optimizer.status()
    finally:
        await optimizer.close()
    assert status.state == "failed" and "does not serve 'bpo-fake'" in status.detail


async def test_configured_model_missing_on_server_fails_with_its_name(upstream: FakeUpstream) -> None:
    optimizer = await started(upstream.base_url, replace(OPTIONS, remote_model="nope"), startup_grace=0.0)
    try:
        status = optimizer.status()
        assert status.state == "failed"
        assert "'nope'" in status.detail and "bpo-fake" in status.detail
        with pytest.raises(OptimizerUnavailable):
            await optimizer.optimize("hi", "stable")
    finally:
        await optimizer.close()


async def test_unreachable_server_is_unavailable_then_recovers_when_it_comes_up() -> None:
    port = free_port()
    optimizer = await started(f"http://127.0.0.1:{port}/v1", startup_grace=0.0)
    late = None
    try:
        assert optimizer.status().state == "failed"
        assert "127.0.0.1" in optimizer.status().detail and "retrying" in optimizer.status().detail
        assert optimizer.identity == optimizer.status().optimizer == "remote:bpo-fake@failed"  # not "pending"
        with pytest.raises(OptimizerUnavailable):
            await optimizer.optimize("hi", "stable")
        late = FakeUpstream(port=port).start()
        await until(lambda: optimizer.status().state == "ready")
        assert (await optimizer.optimize("hi", "stable")).text.startswith("hi ")
    finally:
        await optimizer.close()
        if late is not None:
            late.stop()


async def test_one_shot_use_gives_up_at_the_first_unreachable_probe() -> None:
    optimizer = await started(f"http://127.0.0.1:{free_port()}/v1", replace(OPTIONS, retry_unreachable=False))
    try:
        status = optimizer.status()
        assert status.state == "failed" and "unreachable" in status.detail
        assert "retrying" not in status.detail  # nothing retries: bpo rewrite says so and exits
    finally:
        await optimizer.close()


async def test_server_that_rejects_extras_gets_plain_openai_fields(upstream: FakeUpstream) -> None:
    def strict(recorded: Recorded) -> Reply:
        if "min_tokens" in recorded.json:
            return Reply(status=400, json={"error": {"message": "unknown field min_tokens"}})
        return completion_reply(recorded.json)

    upstream.responders["/v1/completions"] = strict
    optimizer = await started(upstream.base_url)
    try:
        first = await optimizer.optimize("Tell me a joke", "aggressive")
        second = await optimizer.optimize("Tell me a story", "aggressive")
    finally:
        await optimizer.close()
    assert first.text.startswith("Tell me a joke") and second.text.startswith("Tell me a story")
    assert ["min_tokens" in body for body in completion_bodies(upstream)] == [True, False, False]


async def test_vllm_shaped_refusal_of_bad_words_also_drops_the_extras(upstream: FakeUpstream) -> None:
    def strict(recorded: Recorded) -> Reply:
        if "bad_words" in recorded.json:
            return Reply(status=400, json={"object": "error", "type": "BadRequestError", "code": 400,
                                           "message": "bad_words is not supported by this server"})
        return completion_reply(recorded.json)

    upstream.responders["/v1/completions"] = strict
    optimizer = await started(upstream.base_url)
    try:
        rewrite = await optimizer.optimize("Tell me a joke", "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.text.startswith("Tell me a joke")
    assert ["bad_words" in body for body in completion_bodies(upstream)] == [True, False]


async def test_context_length_400_keeps_the_extras(upstream: FakeUpstream) -> None:
    too_long = "This model's maximum context length is 2048 tokens. However, you requested 2300 tokens."

    def limited(recorded: Recorded) -> Reply:
        if "novel" in recorded.json["prompt"]:
            return Reply(status=400, json={"error": {"message": too_long, "type": "BadRequestError",
                                                     "param": None, "code": 400}})
        return completion_reply(recorded.json)

    upstream.responders["/v1/completions"] = limited
    optimizer = await started(upstream.base_url)
    try:
        with pytest.raises(OptimizerError, match="400"):
            await optimizer.optimize("Summarise this whole novel", "aggressive")
        rewrite = await optimizer.optimize("Tell me a joke", "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.text.startswith("Tell me a joke")
    # No retry without the extras, and the next aggressive rewrite still sends them.
    assert ["min_tokens" in body for body in completion_bodies(upstream)] == [True, True]
    assert completion_bodies(upstream)[1]["bad_words"] == list(BANNED_STRINGS)


def test_only_a_400_naming_an_extra_counts_as_refusing_them() -> None:
    assert rejects_extras(400, {"detail": [{"loc": ["body", "min_tokens"], "msg": "Extra inputs are not permitted"}]})
    assert rejects_extras(400, "unrecognized field bad_words")
    assert not rejects_extras(503, {"error": {"message": "min_tokens queue is full"}})
    # pydantic echoes the request as "input": a complaint about the prompt is not one about min_tokens
    echoed = {"detail": [{"loc": ["body", "prompt"], "msg": "String too long", "input": {"min_tokens": 9}}]}
    assert not rejects_extras(400, echoed)
    assert not rejects_extras(400, None)


async def test_server_error_and_malformed_answer_raise_optimizer_error(
    remote: RemoteOptimizer, upstream: FakeUpstream
) -> None:
    upstream.responders["/v1/completions"] = lambda r: Reply(status=503, json={"error": {"message": "busy"}})
    with pytest.raises(OptimizerError, match="503"):
        await remote.optimize("hi", "stable")
    upstream.responders["/v1/completions"] = lambda r: Reply(json={"choices": []})
    with pytest.raises(OptimizerError, match="choices"):
        await remote.optimize("hi", "stable")
    assert remote.status().state == "ready"


async def test_deadline_bounds_a_slow_server(upstream: FakeUpstream) -> None:
    upstream.responders["/v1/completions"] = lambda r: replace(completion_reply(r.json), delay=1.0)
    optimizer = await started(upstream.base_url, replace(OPTIONS, request_timeout=0.3))
    try:
        with pytest.raises(OptimizerError, match=r"did not answer within 0\.3 s"):
            await optimizer.optimize("hi", "stable")
    finally:
        await optimizer.close()


async def test_api_key_is_sent_and_concurrent_rewrites_share_the_pool(upstream: FakeUpstream) -> None:
    optimizer = await started(upstream.base_url, replace(OPTIONS, api_key="sk-remote"))
    try:
        texts = [f"prompt number {i}" for i in range(16)]
        rewrites = await asyncio.gather(*(optimizer.optimize(t, "stable") for t in texts))
    finally:
        await optimizer.close()
    assert [r.text.split(" Please")[0] for r in rewrites] == texts
    assert {r.headers["authorization"] for r in upstream.requests_to("/v1/completions")} == {"Bearer sk-remote"}


async def test_cancelled_rewrite_leaves_the_backend_usable(remote: RemoteOptimizer, upstream: FakeUpstream) -> None:
    upstream.responders["/v1/completions"] = lambda r: replace(completion_reply(r.json), delay=1.0)
    task = asyncio.create_task(remote.optimize("slow", "stable"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    upstream.responders.clear()
    assert (await remote.optimize("fast", "stable")).text.startswith("fast ")


def length_cut(upstream: FakeUpstream, text: str) -> None:
    def reply(recorded: Recorded) -> Reply:
        answer = completion_reply(recorded.json, lambda prompt: text)
        answer.json["choices"][0]["finish_reason"] = "length"
        return answer

    upstream.responders["/v1/completions"] = reply


async def test_a_completion_cut_at_max_tokens_is_marked_truncated(remote: RemoteOptimizer,
                                                                   upstream: FakeUpstream) -> None:
    length_cut(upstream, "Tell me about the Argonautica; E")
    rewrite = await remote.optimize("Tell me about the Argonautica; Explain why Jason sailed.", "stable")
    assert rewrite.truncated
    upstream.responders.pop("/v1/completions")
    assert not (await remote.optimize("Tell me about black holes.", "stable")).truncated


async def test_max_tokens_is_sized_from_the_prompt(upstream: FakeUpstream) -> None:
    optimizer = await started(upstream.base_url, replace(OPTIONS, max_new_tokens=1024))
    try:
        await optimizer.optimize("Hi there.", "stable")
        await optimizer.optimize(" ".join(["word"] * 90), "aggressive")
    finally:
        await optimizer.close()
    short, long = completion_bodies(upstream)
    assert short["max_tokens"] == MIN_BUDGET_TOKENS
    # 90 words are about 121 tokens (with BOS): room for 6x that, and the minimum stays under the budget.
    assert long["max_tokens"] == 6 * 121 and long["min_tokens"] == 126


async def test_aggressive_prompt_whose_minimum_exceeds_the_cap_is_not_sent(upstream: FakeUpstream) -> None:
    optimizer = await started(upstream.base_url, replace(OPTIONS, max_new_tokens=20))
    try:
        rewrite = await optimizer.optimize(" ".join(["word"] * 30), "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.truncated and completion_bodies(upstream) == []
