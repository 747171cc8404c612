"""The shadow judge with hand-written fakes: both orders, flip -> tie, sampling, budget, bounds, failures, shapes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
import pytest
from starlette.responses import Response, StreamingResponse

from proxy.metrics import Metrics
from proxy.report import summarize_shadow
from proxy.shadow import (
    MinuteBudget,
    ShadowJob,
    ShadowJudge,
    control_body,
)
from proxy.shapes import CHAT, MESSAGES, RESPONSES, Shape
from tests.fakes.proxy_server import make_settings
from tests.fakes.upstream import Reply, chat_reply, messages_reply, responses_reply, sse_chunks
from tests.optimizer.cache_helpers import until
from training.evaluate import outcome_of
from training.evaluate import summarize as summarize_eval

TREATMENT, CONTROL = "the detailed treatment answer", "the plain control answer"


class RecordingSink:
    enabled = True

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class FakeControl:
    """Answers the control request; can hold every call until released, and counts calls in flight."""

    def __init__(self, answer: str = CONTROL, fail: bool = False) -> None:
        self.answer_text, self.fail = answer, fail
        self.calls: list[tuple[dict[str, Any], Mapping[str, str]]] = []
        self.shapes: list[Shape] = []
        self.release = asyncio.Event()
        self.release.set()
        self.in_flight = self.most_in_flight = 0

    async def answer(self, shape: Shape, body: dict[str, Any], headers: Mapping[str, str]) -> str:
        self.calls.append((body, headers))
        self.shapes.append(shape)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        if self.fail:
            raise RuntimeError("upstream down")
        return self.answer_text


class FakeJudge:
    """Prefers the answer containing ``prefer`` (or always answers ``fixed``); records every prompt."""

    def __init__(self, prefer: str = TREATMENT, fixed: str | None = None) -> None:
        self.prefer, self.fixed = prefer, fixed
        self.prompts: list[str] = []

    async def __call__(self, messages: list[dict[str, str]]) -> str:
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        if self.fixed is not None:
            return self.fixed
        answer_a = answer_in(prompt, "A")
        return "A is more thorough.\n[[A]]" if self.prefer in answer_a else "B is better. [[B]]"


def answer_in(prompt: str, letter: str) -> str:
    return prompt.split(f"[ANSWER {letter}]\n", 1)[1].split(f"\n[/ANSWER {letter}]", 1)[0]


class OrderJudge:
    """Answers ``treatment_first`` when the treatment answer is shown first, else ``control_first``."""

    def __init__(self, treatment_first: str, control_first: str) -> None:
        self.replies = {True: treatment_first, False: control_first}

    async def __call__(self, messages: list[dict[str, str]]) -> str:
        return f"Verdict: [[{self.replies[TREATMENT in answer_in(messages[-1]['content'], 'A')]}]]"


def make_judge(control: FakeControl | None = None, judge: FakeJudge | None = None, **values: Any
               ) -> tuple[ShadowJudge, RecordingSink, Metrics]:
    values.setdefault("shadow_judge_model", "judge-model")
    values.setdefault("shadow_rate", 1.0)
    sink, metrics = RecordingSink(), Metrics()
    shadow = ShadowJudge(make_settings(**values), metrics, sink, control or FakeControl(), judge or FakeJudge())
    return shadow, sink, metrics


def job(request_id: str = "req_1", **body: Any) -> ShadowJob:
    request = {"model": "fake-model", "messages": [{"role": "user", "content": "Why is the sky blue?"}], **body}
    return ShadowJob(CHAT, request_id, request, "Why is the sky blue?", TREATMENT, {"authorization": "Bearer sk-c"})


def verdicts(metrics: Metrics, verdict: str) -> float:
    return metrics.registry.get_sample_value("bpo_shadow_verdicts_total", {"verdict": verdict}) or 0.0


VERDICT_PAIRS = [(a, b) for a in ("A", "B", "C") for b in ("A", "B", "C")]


async def test_shadow_and_bpo_eval_turn_the_same_verdicts_into_the_same_numbers() -> None:
    """Both paths use optimizer.judge: the same verdict pairs give the same outcomes and the same ΔWR."""
    letter = {"A": "A", "B": "B", "C": "tie"}
    shadow_outcomes, records = [], []
    for treatment_first, control_first in VERDICT_PAIRS:
        shadow, sink, _ = make_judge(judge=OrderJudge(treatment_first, control_first))
        shadow.submit(job())
        await shadow.drain()
        shadow_outcomes.append(sink.events[0]["verdict"])
        # bpo eval's orders: (A=original, B=optimized), then swapped; the control answer is the original's.
        records.append({"set": "pairs", "prompt": "p", "optimized_prompt": "q",
                        "verdicts": [letter[control_first], letter[treatment_first]]})
    assert shadow_outcomes == [outcome_of(record) for record in records]
    # One win plus a tie in the other order is a win; a flip with the order is a tie (optimizer/judge.py).
    assert shadow_outcomes == ["tie", "win", "win", "loss", "tie", "loss", "loss", "win", "tie"]
    counts = {v: shadow_outcomes.count(v) for v in ("win", "tie", "loss")}
    net_win_rate = summarize_shadow(counts).net_win_rate
    assert net_win_rate is not None
    assert net_win_rate * 100 == pytest.approx(summarize_eval(records).tallies[0].delta_wr)


def test_the_control_request_asks_for_one_plain_answer() -> None:
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}, "n": 3,
            "temperature": 0.2, "logprobs": True}
    assert control_body(body) == {"model": "m", "messages": [], "temperature": 0.2}
    responses = {"model": "m", "input": "q", "stream": True, "background": True, "store": True}
    assert control_body(responses) == {"model": "m", "input": "q", "store": True}  # answered now, not queued


def test_the_minute_budget_slides() -> None:
    now = [0.0]
    budget = MinuteBudget(2, clock=lambda: now[0])
    assert [budget.take(), budget.take(), budget.take()] == [True, True, False]
    now[0] = 59.9
    assert not budget.take()
    now[0] = 60.0
    assert [budget.take(), budget.take(), budget.take()] == [True, True, False]  # both t=0 starts expired


async def test_both_orders_are_asked_and_a_consistent_preference_wins() -> None:
    control, judge = FakeControl(), FakeJudge(prefer=TREATMENT)
    shadow, sink, metrics = make_judge(control, judge)
    shadow.submit(job(stream=True, n=2))
    await shadow.drain()
    assert len(judge.prompts) == 2
    first, second = judge.prompts
    assert first.index(TREATMENT) < first.index(CONTROL) and second.index(CONTROL) < second.index(TREATMENT)
    assert all("Why is the sky blue?" in prompt for prompt in judge.prompts)
    assert control.calls[0][0] == {"model": "fake-model",
                                   "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    assert control.calls[0][1] == {"authorization": "Bearer sk-c"}
    (event,) = sink.events
    assert {k: event[k] for k in ("type", "request_id", "verdict", "orders", "judge_model", "experiment")} == {
        "type": "shadow", "request_id": "req_1", "verdict": "win", "judge_model": "judge-model",
        "orders": {"treatment_first": "A", "control_first": "B"}, "experiment": "default"}
    assert "treatment_answer" not in event and "question" not in event  # no text unless asked for
    assert verdicts(metrics, "win") == 1


async def test_a_judge_that_follows_position_gives_a_tie() -> None:
    shadow, sink, metrics = make_judge(judge=FakeJudge(fixed="Answer A, clearly. [[A]]"))
    shadow.submit(job())
    await shadow.drain()
    assert sink.events[0]["verdict"] == "tie" and verdicts(metrics, "tie") == 1


async def test_preferring_control_is_a_loss_and_texts_are_kept_when_asked() -> None:
    shadow, sink, _ = make_judge(judge=FakeJudge(prefer=CONTROL), events_include_text=True)
    shadow.submit(job())
    await shadow.drain()
    event = sink.events[0]
    assert event["verdict"] == "loss"
    assert (event["question"], event["treatment_answer"], event["control_answer"]) == (
        "Why is the sky blue?", TREATMENT, CONTROL)


@pytest.mark.parametrize(("control", "judge"), [
    (FakeControl(fail=True), FakeJudge()), (FakeControl(), FakeJudge(fixed="no idea"))])
async def test_failures_become_error_verdicts_never_exceptions(control: FakeControl, judge: FakeJudge) -> None:
    shadow, sink, metrics = make_judge(control, judge)
    shadow.submit(job())
    await shadow.drain()
    assert sink.events[0]["verdict"] == "error" and sink.events[0]["error"]
    assert verdicts(metrics, "error") == 1


def test_sampling_follows_the_rate_and_needs_a_judge_model() -> None:
    assert not make_judge(shadow_rate=0.0)[0].sample()
    assert not make_judge(shadow_judge_model=None)[0].sample()
    shadow, _, _ = make_judge(shadow_rate=0.25, shadow_max_per_minute=10_000)
    picked = sum(shadow.sample() for _ in range(2000))
    assert 400 < picked < 600  # 500 expected, sd 19


def test_the_budget_caps_judgements_per_minute() -> None:
    shadow, _, metrics = make_judge(shadow_max_per_minute=3)
    assert [shadow.sample() for _ in range(5)] == [True, True, True, False, False]
    assert metrics.registry.get_sample_value("bpo_shadow_skipped_total", {"reason": "budget"}) == 2


async def test_concurrency_is_bounded_and_excess_jobs_are_not_sampled() -> None:
    control = FakeControl()
    control.release.clear()
    sink, metrics = RecordingSink(), Metrics()
    shadow = ShadowJudge(make_settings(shadow_judge_model="j", shadow_rate=1.0, shadow_max_per_minute=1000),
                         metrics, sink, control, FakeJudge(), max_concurrency=2, max_pending=5)
    for i in range(5):
        assert shadow.sample()
        shadow.submit(job(f"req_{i}"))
    assert not shadow.sample()  # five pending: the sixth is skipped, not queued
    assert metrics.registry.get_sample_value("bpo_shadow_skipped_total", {"reason": "busy"}) == 1
    await until(lambda: control.in_flight == 2)
    await asyncio.sleep(0.01)
    assert control.most_in_flight == 2
    control.release.set()
    await shadow.drain()
    assert len(sink.events) == 5 and control.most_in_flight == 2


async def _stream(chunks: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(chunks):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("client went away")
        yield chunk


async def test_attach_reads_a_stream_as_it_passes_and_judges_it_once_complete() -> None:
    shadow, sink, _ = make_judge()
    chunks = sse_chunks("m", TREATMENT)
    body = {"model": "m", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "stream": True}
    response = shadow.attach(StreamingResponse(_stream(chunks)), CHAT, "req_s", body, {})
    assert isinstance(response, StreamingResponse)
    passed = [chunk async for chunk in response.body_iterator]
    assert passed == chunks  # the client's bytes are untouched
    await shadow.drain()
    assert sink.events[0]["verdict"] == "win"


async def test_attach_skips_broken_streams_errors_and_turns_without_user_text() -> None:
    shadow, sink, metrics = make_judge()
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    broken = shadow.attach(StreamingResponse(_stream(sse_chunks("m", TREATMENT), fail_after=2)), CHAT, "r1", body, {})
    assert isinstance(broken, StreamingResponse)
    with pytest.raises(ConnectionError):
        _ = [chunk async for chunk in broken.body_iterator]
    shadow.attach(Response(b'{"error": {}}', status_code=429), CHAT, "r2", body, {})
    shadow.attach(Response(b"{}"), CHAT, "r3", {"model": "m", "messages": [{"role": "assistant", "content": "a"}]}, {})
    await shadow.drain()
    assert sink.events == []
    assert metrics.registry.get_sample_value("bpo_shadow_skipped_total", {"reason": "incomplete"}) == 1


class ExplodingHeaders(Mapping[str, str]):
    """Headers that fail when read: a stand-in for any fault inside ``attach``."""

    def __getitem__(self, key: str) -> str:
        raise RuntimeError("unreadable headers")

    def __iter__(self) -> Any:
        raise RuntimeError("unreadable headers")

    def __len__(self) -> int:
        return 1


def fail_open_count(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("bpo_fail_open_total", {"component": "shadow"}) or 0.0


async def test_an_odd_upstream_body_is_skipped_and_goes_out_unchanged() -> None:
    shadow, sink, metrics = make_judge()
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    for payload in (b'{"choices": [1]}', b'{"choices": "ab"}', b'{"choices": [{"message": "x"}]}'):
        response = Response(payload, media_type="application/json")
        assert shadow.attach(response, CHAT, "r", body, {}) is response and response.body == payload
    await shadow.drain()
    assert sink.events == [] and fail_open_count(metrics) == 0
    assert metrics.registry.get_sample_value("bpo_shadow_skipped_total", {"reason": "no-answer"}) == 3


async def test_a_fault_inside_attach_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    shadow, sink, metrics = make_judge()
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    payload = orjson.dumps(chat_reply(body, TREATMENT).json)
    response = Response(payload, status_code=200, media_type="application/json")
    assert shadow.attach(response, CHAT, "req_x", body, ExplodingHeaders()) is response
    assert (response.status_code, response.body) == (200, payload)
    await shadow.drain()
    assert sink.events == [] and fail_open_count(metrics) == 1
    assert "req_x" in caplog.text and "unreadable headers" in caplog.text


QUESTION = "Why is the sky blue?"
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
# A request of each other shape: an earlier turn, then the question as its newest user turn.
SHAPED: dict[str, tuple[Shape, dict[str, Any], Callable[[dict[str, Any], str], Reply]]] = {
    "responses": (RESPONSES, {"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Earlier question"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Earlier answer"}]},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]}, responses_reply),
    "messages": (MESSAGES, {"model": "m", "max_tokens": 64, "system": "Be brief.", "messages": [
        {"role": "user", "content": "Earlier question"}, {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, IMAGE]}]}, messages_reply),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", sorted(SHAPED))
async def test_every_shape_is_judged_from_its_own_turn_answer_and_control_call(route: str, stream: bool) -> None:
    shape, request, reply = SHAPED[route]
    body = {**request, "stream": stream}
    control, judge = FakeControl(), FakeJudge(prefer=TREATMENT)
    shadow, sink, _ = make_judge(control, judge)
    answer = reply(body, TREATMENT)
    response = StreamingResponse(_stream(answer.sse or [])) if stream else Response(orjson.dumps(answer.json))
    attached = shadow.attach(response, shape, "req_r", body, {"x-api-key": "sk-a"})
    if isinstance(attached, StreamingResponse):
        assert [chunk async for chunk in attached.body_iterator] == answer.sse
    await shadow.drain()
    (event,) = sink.events
    assert (event["route"], event["request_id"], event["verdict"]) == (route, "req_r", "win")
    assert control.shapes == [shape]
    assert control.calls == [(request, {"x-api-key": "sk-a"})]  # the original request, asked for one plain answer
    assert len(judge.prompts) == 2
    for prompt in judge.prompts:  # the newest turn is the question; the answers are the two texts
        assert QUESTION in prompt and "Earlier question" not in prompt
        assert TREATMENT in prompt and CONTROL in prompt


@pytest.mark.parametrize(("shape", "payload"), [
    (RESPONSES, {"output": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]}),
    (MESSAGES, {"content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]})])
async def test_a_tool_only_treatment_answer_is_not_judged(shape: Shape, payload: dict[str, Any]) -> None:
    shadow, sink, metrics = make_judge()
    _, body, _ = SHAPED[shape.route]
    response = Response(orjson.dumps(payload), media_type="application/json")
    assert shadow.attach(response, shape, "r", body, {}) is response
    await shadow.drain()
    assert sink.events == []
    assert metrics.registry.get_sample_value("bpo_shadow_skipped_total", {"reason": "no-answer"}) == 1
