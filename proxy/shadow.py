"""Shadow judging: for sampled treatment requests, fetch the control answer and ask a judge which is better.

It covers every rewriting route: the control request goes out as the request's shape's own upstream call
(``UpstreamCalls.send_own``) and both answers are read by the shape's reader (``Shape.answer_text``).

Everything here runs after the user's response is complete, in background tasks with bounded
concurrency and a per-minute budget; the little that runs inside the request (sampling, reading the
answer) fails open, counted in ``bpo_fail_open_total{component="shadow"}``. The judge is
``optimizer.judge``, the same prompt, parser and order rule as ``bpo eval``: it sees both orders (treatment
first, then control first), and ``combine_orders`` turns the two verdicts into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.responses import Response, StreamingResponse

from optimizer.judge import JudgeVerdict, build_judge_messages, combine_orders, parse_verdict
from optimizer.litellm_loader import litellm_model, load_litellm
from proxy.clients import charge_side_spend
from proxy.events import EventSink
from proxy.forward import Exchange
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.shapes import Shape
from proxy.upstream_calls import UpstreamCalls

log = logging.getLogger("bpo.shadow")

# The fields of a request that make no sense when asking again for one plain answer, in any shape (a
# Responses ``background`` request would answer "queued", with no text yet).
_DROPPED_FOR_CONTROL = ("stream", "stream_options", "n", "logprobs", "top_logprobs", "background")
# A streamed answer longer than this is not kept for judging: memory per request stays bounded.
MAX_KEPT_ANSWER_BYTES = 1024 * 1024

class ShadowError(Exception):
    """The control answer or a judgement could not be obtained."""


class ControlClient(Protocol):
    """Gets the answer the control arm would have given: the original request, sent upstream again."""

    async def answer(self, shape: Shape, body: dict[str, Any], headers: Mapping[str, str]) -> str: ...


JudgeCall = Callable[[list[dict[str, str]]], Awaitable[str]]  # messages -> reply text


class ForwardingControlClient:
    """Asks the configured upstream again with the client's auth: the call is built where the client's own
    is (``UpstreamCalls``), in the request's shape, so both go to the same place in the same way."""

    def __init__(self, calls: UpstreamCalls) -> None:
        self.calls = calls

    async def answer(self, shape: Shape, body: dict[str, Any], headers: Mapping[str, str]) -> str:
        exchange = Exchange()
        response = await self.calls.send_own(shape.route, body, headers, exchange)
        payload = await _body_of(response)
        charge_side_spend(str(body["model"]), exchange.usage)
        if response.status_code != 200:
            raise ShadowError(f"the upstream answered the control request with {response.status_code}")
        text = shape.answer_text(payload)
        if text is None:
            raise ShadowError("the control response held no answer text")
        return text


async def _body_of(response: Response) -> bytes:
    """A response's bytes; a stream (an upstream that streams unasked) is read to its end, which releases its
    connection (a plain answer is read whole too)."""
    if not isinstance(response, StreamingResponse):
        return bytes(response.body)
    return b"".join([chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                     async for chunk in response.body_iterator])


@dataclass(frozen=True)
class ShadowJob:
    """One treatment request to judge. ``body`` is the request as the client sent it (original prompt), in
    ``shape``."""

    shape: Shape
    request_id: str
    body: dict[str, Any]
    question: str
    treatment_answer: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    experiment: str | None = None


def control_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The client's request, asked once more for one non-streamed answer."""
    return {k: v for k, v in body.items() if k not in _DROPPED_FOR_CONTROL}


class MinuteBudget:
    """At most ``limit`` starts in any sliding 60 seconds."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._starts: deque[float] = deque()

    def take(self) -> bool:
        now = self._clock()
        while self._starts and now - self._starts[0] >= 60.0:
            self._starts.popleft()
        if len(self._starts) >= self.limit:
            return False
        self._starts.append(now)
        return True


def litellm_judge(settings: Settings) -> JudgeCall:
    """A judge call through litellm; a judge base URL means litellm's ``openai/`` provider at that URL."""
    model = settings.shadow_judge_model or ""
    options: dict[str, Any] = {}
    if settings.shadow_judge_api_key:
        options["api_key"] = settings.shadow_judge_api_key
    if settings.shadow_judge_base_url:
        model = litellm_model(model, settings.shadow_judge_base_url)
        options["api_base"] = settings.shadow_judge_base_url
        # Self-hosted judges rarely check keys, but the OpenAI client insists on one. Never the
        # upstream's key: the judge may be another party.
        options.setdefault("api_key", "EMPTY")

    async def judge(messages: list[dict[str, str]]) -> str:
        litellm = load_litellm()
        response = await litellm.acompletion(model=model, messages=messages,
                                             temperature=0.0, max_tokens=512, **options)
        usage = getattr(response, "usage", None)
        charge_side_spend(model, usage.model_dump() if usage is not None and hasattr(usage, "model_dump") else None)
        return str(response.choices[0].message.content or "")

    return judge


class ShadowJudge:
    """Samples treatment requests and judges them in the background; ``sample``/``submit`` never wait."""

    def __init__(self, settings: Settings, metrics: Metrics, sink: EventSink, control: ControlClient,
                 judge: JudgeCall | None = None, *, max_concurrency: int = 4, max_pending: int = 64,
                 rng: random.Random | None = None) -> None:
        self.enabled = bool(settings.shadow_judge_model) and settings.shadow_rate > 0
        self.rate = settings.shadow_rate
        self.judge_model = settings.shadow_judge_model
        self.include_text = settings.events_include_text
        self.experiment = settings.ab_experiment
        self.metrics = metrics
        self.sink = sink
        self.control = control
        self.judge = judge or litellm_judge(settings)
        self.budget = MinuteBudget(settings.shadow_max_per_minute)
        self.max_pending = max_pending
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warmup: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        if self.enabled:
            # litellm's import takes seconds of CPU: a thread keeps it off the event loop, and not
            # awaiting it here keeps start-up fast; the first judgement waits for it instead.
            self._warmup = asyncio.create_task(asyncio.to_thread(load_litellm), name="shadow-litellm-import")

    def sample(self) -> bool:
        """Pick this treatment request for judging? Decide before the response so a stream can be kept."""
        if not self.enabled or self._rng.random() >= self.rate:
            return False
        if len(self._tasks) >= self.max_pending:
            self.metrics.shadow_skipped.labels(reason="busy").inc()
            return False
        if not self.budget.take():
            self.metrics.shadow_skipped.labels(reason="budget").inc()
            return False
        return True

    def attach(self, response: Response, shape: Shape, request_id: str, body: Mapping[str, Any],
               headers: Mapping[str, str]) -> Response:
        """For a rewritten treatment request: sample it and, when picked, judge its answer once complete.

        ``body`` is the request in ``shape`` as the client sent it (original prompt), ``headers`` the client's
        (for the control call's auth). A plain response is judged from its body; a stream is read as it passes to
        the client (bytes untouched) and judged only if it ran to the end. Fails open: whatever goes wrong
        here is logged and counted, and the client gets ``response`` as it is.
        """
        try:
            return self._attach(response, shape, request_id, body, headers)
        except Exception:  # the documented fail-open: judging must never cost the user their answer
            self._fail_open(request_id)
            return response

    def _attach(self, response: Response, shape: Shape, request_id: str, body: Mapping[str, Any],
                headers: Mapping[str, str]) -> Response:
        if response.status_code != 200 or not self.sample():
            return response
        turn = shape.newest_turn(body)
        if turn is None:
            return response
        job = ShadowJob(shape, request_id, dict(body), turn.prompt.text, headers=dict(headers))
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._keep_stream(response.body_iterator, job)
            return response
        self._submit_payload(bytes(response.body), job)
        return response

    def _fail_open(self, request_id: str) -> None:
        log.exception("shadow judging of %s failed open; the response goes out unjudged", request_id)
        self.metrics.fail_open.labels(component="shadow").inc()

    async def _keep_stream(self, chunks: Any, job: ShadowJob) -> AsyncIterator[Any]:
        kept: list[bytes] = []
        size = 0
        complete = False
        try:
            async for chunk in chunks:
                if size <= MAX_KEPT_ANSWER_BYTES:
                    piece = chunk if isinstance(chunk, bytes) else str(chunk).encode()
                    kept.append(piece)
                    size += len(piece)
                yield chunk
            complete = True
        finally:
            # Close the wrapped relay now (not at garbage collection): its own cleanup cancels the
            # upstream generation when the client went away.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
            if complete and size <= MAX_KEPT_ANSWER_BYTES:
                try:
                    self._submit_payload(b"".join(kept), job)
                except Exception:  # the same fail-open: the stream has reached the client, keep its end clean
                    self._fail_open(job.request_id)
            elif not complete:
                self.metrics.shadow_skipped.labels(reason="incomplete").inc()
            else:
                self.metrics.shadow_skipped.labels(reason="too-long").inc()

    def _submit_payload(self, payload: bytes, job: ShadowJob) -> None:
        answer = job.shape.answer_text(payload)
        if answer is None:
            self.metrics.shadow_skipped.labels(reason="no-answer").inc()
            return
        self.submit(dataclasses.replace(job, treatment_answer=answer))

    def submit(self, job: ShadowJob) -> None:
        """Judge ``job`` in the background (call only for requests ``sample`` picked)."""
        task = asyncio.get_running_loop().create_task(self._judge(job), name=f"shadow-{job.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the judgements in flight (tests and graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, grace: float = 5.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.drain()), timeout=grace)
        pending = [*self._tasks, *([self._warmup] if self._warmup is not None else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _judge(self, job: ShadowJob) -> None:
        event: dict[str, Any] = {"type": "shadow", "request_id": job.request_id, "route": job.shape.route,
                                 "experiment": job.experiment or self.experiment,
                                 "model": job.body.get("model"), "judge_model": self.judge_model}
        try:
            async with self._semaphore:
                event.update(await self._verdict(job))
        except Exception as exc:  # the documented fail-open: a failed judgement is recorded, never raised
            # The class only: a provider's error text may quote the answers being judged.
            log.warning("shadow judgement of %s failed: %s", job.request_id, type(exc).__name__)
            event.update(verdict="error", error=type(exc).__name__)
        event["time"] = time.time()
        self.metrics.shadow_verdicts.labels(verdict=event["verdict"]).inc()
        self.sink.emit(event)

    async def _verdict(self, job: ShadowJob) -> dict[str, Any]:
        if self._warmup is not None:
            await self._warmup
        started = time.perf_counter()
        control = await self.control.answer(job.shape, control_body(job.body), job.headers)
        control_ms = (time.perf_counter() - started) * 1000
        treatment_first, control_first = await asyncio.gather(
            self._ask(job.question, job.treatment_answer, control),
            self._ask(job.question, control, job.treatment_answer))
        result: dict[str, Any] = {
            # combine_orders takes (original first, optimized first): control is the original prompt's answer.
            "verdict": combine_orders(control_first, treatment_first),
            "orders": {"treatment_first": treatment_first, "control_first": control_first},
            "control_ms": round(control_ms, 3),
            "judge_ms": round((time.perf_counter() - started) * 1000 - control_ms, 3),
        }
        if self.include_text:
            result.update(question=job.question, treatment_answer=job.treatment_answer,
                          control_answer=control)
        return result

    async def _ask(self, question: str, answer_a: str, answer_b: str) -> JudgeVerdict:
        reply = await self.judge(build_judge_messages(question, answer_a, answer_b))
        verdict = parse_verdict(reply)
        if verdict is None:
            raise ShadowError(f"the judge gave no [[A]]/[[B]]/[[C]] verdict: {reply[-200:]!r}")
        return verdict
