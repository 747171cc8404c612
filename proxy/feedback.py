"""``POST /v1/bpo/feedback``: a score for an earlier response, recorded as an event joined by request id."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.errors import error_response
from proxy.protocol import read_body
from proxy.settings import Settings

UNKNOWN_ARM = "unknown"
MAX_BODY_BYTES = 64 * 1024
MAX_REQUEST_ID_CHARS = 256
MAX_COMMENT_CHARS = 8192


class RecentRequests:
    """A bounded request id -> arm map, so feedback reaching this replica can be counted per arm.

    The core calls ``remember`` once per chat completion; the oldest ids fall out first. Feedback for an
    id this replica never saw (another replica's, or an old one) is counted as arm ``unknown``; the
    report still joins it through the events.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._arms: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, arm: str) -> None:
        self._arms[request_id] = arm
        self._arms.move_to_end(request_id)
        while len(self._arms) > self.max_entries:
            self._arms.popitem(last=False)

    def arm_of(self, request_id: str) -> str | None:
        return self._arms.get(request_id)

    def __len__(self) -> int:
        return len(self._arms)


@dataclass(frozen=True)
class Feedback:
    request_id: str
    score: float
    comment: str | None


class MalformedFeedback(ValueError):
    """The body is not ``{"request_id": str, "score": number, "comment"?: str}``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_feedback(raw: bytes) -> Feedback:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedFeedback(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedFeedback("body must be a JSON object")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise MalformedFeedback("request_id must be a non-empty string", "request_id")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise MalformedFeedback(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters", "request_id")
    score = body.get("score")
    # bool is an int in Python, but `true` is not a score a client meant to send as a number.
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise MalformedFeedback("score must be a finite number", "score")
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise MalformedFeedback("comment must be a string", "comment")
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise MalformedFeedback(f"comment is longer than {MAX_COMMENT_CHARS} characters", "comment")
    return Feedback(request_id, float(score), comment)


def feedback_event(feedback: Feedback, arm: str) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "feedback", "request_id": feedback.request_id, "time": time.time(),
                             "score": feedback.score, "arm": arm}
    if feedback.comment is not None:
        event["comment"] = feedback.comment
    return event


def serves_alone(settings: Settings) -> bool:
    """Whether an id this process does not remember was never served: one worker, events of its own.

    With ``--workers N`` or events in a Redis stream (what replicas share), another process may have served
    it, and the report joins the feedback to that request through the events.
    """
    return settings.workers == 1 and not settings.events.startswith(("redis://", "rediss://"))


async def feedback_endpoint(request: Request) -> Response:
    """Records the score as a ``feedback`` event and in ``bpo_feedback_total{arm}``.

    ``recorded`` says whether an events sink took it (``--events none``: only the counter did).
    """
    try:
        feedback = parse_feedback(await read_body(request, MAX_BODY_BYTES))
    except MalformedFeedback as exc:
        return error_response(400, str(exc), "invalid_request_error", exc.param, "invalid_feedback")
    state = request.app.state
    recent: RecentRequests | None = getattr(state, "recent_requests", None)
    arm = recent.arm_of(feedback.request_id) if recent is not None else None
    if arm is None and recent is not None and serves_alone(state.settings):
        return error_response(
            404, f"No response of this gateway had the X-Request-Id {feedback.request_id!r} (it remembers its "
                 f"last {recent.max_entries:,} since it started).", "invalid_request_error", "request_id",
            "unknown_request_id")
    arm = arm or UNKNOWN_ARM
    state.events.emit(feedback_event(feedback, arm))
    state.metrics.feedback.labels(arm=arm).inc()
    return JSONResponse({"object": "bpo.feedback", "request_id": feedback.request_id, "arm": arm,
                         "recorded": state.events.enabled})
