"""Feedback bodies: what is accepted, what is a 400, and the bounded request id -> arm map."""

from __future__ import annotations

import httpx
import pytest

from proxy.feedback import MalformedFeedback, RecentRequests, feedback_event, parse_feedback
from tests.fakes.proxy_server import RunningProxy


def test_a_valid_body_parses_with_an_optional_comment() -> None:
    assert parse_feedback(b'{"request_id": "req_1", "score": 1}').score == 1.0
    parsed = parse_feedback('{"request_id": "req_2", "score": 4.5, "comment": "très bien"}'.encode())
    assert (parsed.request_id, parsed.score, parsed.comment) == ("req_2", 4.5, "très bien")


@pytest.mark.parametrize(("body", "param"), [
    (b"not json", None),
    (b"[1, 2]", None),
    (b'{"score": 1}', "request_id"),
    (b'{"request_id": "", "score": 1}', "request_id"),
    (b'{"request_id": 7, "score": 1}', "request_id"),
    (b'{"request_id": "r"}', "score"),
    (b'{"request_id": "r", "score": "5"}', "score"),
    (b'{"request_id": "r", "score": true}', "score"),
    (b'{"request_id": "r", "score": null}', "score"),
    (b'{"request_id": "r", "score": 1, "comment": 3}', "comment"),
    (b'{"request_id": "' + b"x" * 300 + b'", "score": 1}', "request_id"),
])
def test_malformed_bodies_are_rejected_naming_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(MalformedFeedback) as caught:
        parse_feedback(body)
    assert caught.value.param == param


def test_non_finite_scores_are_rejected() -> None:
    # orjson refuses NaN/Infinity literals, and a huge exponent overflows to inf: both must be 400s.
    for body in (b'{"request_id": "r", "score": NaN}', b'{"request_id": "r", "score": 1e999}'):
        with pytest.raises(MalformedFeedback):
            parse_feedback(body)


def test_the_event_carries_the_arm_and_keeps_the_comment_only_when_sent() -> None:
    event = feedback_event(parse_feedback(b'{"request_id": "r", "score": 0}'), "control")
    assert {k: event[k] for k in ("type", "request_id", "score", "arm")} == {
        "type": "feedback", "request_id": "r", "score": 0.0, "arm": "control"}
    assert "comment" not in event and isinstance(event["time"], float)


def test_recent_requests_forgets_the_oldest_beyond_its_bound() -> None:
    recent = RecentRequests(max_entries=3)
    for i in range(5):
        recent.remember(f"r{i}", "treatment" if i % 2 else "control")
    assert len(recent) == 3
    assert recent.arm_of("r0") is None and recent.arm_of("r1") is None
    assert (recent.arm_of("r2"), recent.arm_of("r3"), recent.arm_of("r4")) == ("control", "treatment", "control")
    recent.remember("r2", "control")  # touched again: now the newest
    recent.remember("r5", "treatment")
    assert recent.arm_of("r2") == "control" and recent.arm_of("r3") is None


def test_an_oversized_feedback_body_is_refused_with_413(proxy: RunningProxy) -> None:
    """Feedback is a score and a comment, never a document: 64 KiB is the most it takes."""
    body = {"request_id": "r", "score": 1, "comment": "x" * 70_000}
    response = httpx.post(proxy.base_url + "/bpo/feedback", json=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
