"""End to end A/B: the openai SDK -> the real gateway (split configured) -> the fake provider."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from proxy.report import load_events, summarize
from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, default_rewrite

from .conftest import StartProxy

PROMPT = "Suggest a name for a bakery"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sdk(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=20)


def ask(client: openai.OpenAI, user: str | None = None, headers: dict[str, str] | None = None,
        **extra: Any) -> Any:
    kwargs: dict[str, Any] = {"user": user} if user is not None else {}
    return client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}], extra_headers=headers or {},
        **kwargs, **extra)


def arms_of(proxy: RunningProxy, users: list[str]) -> dict[str, str]:
    client = sdk(proxy)
    return {user: ask(client, user).headers["x-bpo-arm"] for user in users}


def scrape(proxy: RunningProxy) -> Samples:
    """``/metrics`` through prometheus_client's own parser."""
    text = httpx.get(proxy.url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_1000_users_split_with_headers_metrics_and_events_that_agree(
        upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(ab_treatment_percent=30, ab_salt="bakery", ab_experiment="names-v1",
                        events=f"jsonl:{events}")
    client = sdk(proxy)
    arms: dict[str, str] = {}
    for i in range(1000):
        raw = ask(client, f"user-{i}")
        arms[raw.headers["x-request-id"]] = raw.headers["x-bpo-arm"]
        expected_text = default_rewrite(PROMPT) if arms[raw.headers["x-request-id"]] == "treatment" else PROMPT
        assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"] == expected_text
        assert raw.headers["x-bpo-applied"] == ("true" if raw.headers["x-bpo-arm"] == "treatment" else "false")
    treated = sum(arm == "treatment" for arm in arms.values())
    assert 250 <= treated <= 350  # 30% of 1,000; sd 14.5

    samples = scrape(proxy)
    assert sample(samples, "bpo_requests_total", arm="treatment", applied="true", reason="", route="chat") == treated
    assert sample(samples, "bpo_requests_total", arm="control", applied="false",
                  reason="control-arm", route="chat") == 1000 - treated
    assert sample(samples, "bpo_request_seconds_count", arm="treatment", route="chat") == treated
    assert sample(samples, "bpo_upstream_seconds_count", arm="control") == 1000 - treated
    assert sample(samples, "bpo_upstream_tokens_total", arm="treatment", kind="prompt") == 11 * treated

    proxy.stop()  # the sink flushes on shutdown
    written = read_jsonl(events)
    assert len(written) == 1000
    assert {e["request_id"]: e["arm"] for e in written} == arms
    first = written[0]
    assert set(first) == {"type", "request_id", "time", "experiment", "arm", "override", "applied", "reason",
                          "optimizer", "cache", "mode", "model", "stream", "status", "latency_ms",
                          "upstream_ms", "overhead_ms", "usage", "route",
                          "history_replayed"}  # never the prompt text by default
    assert first["experiment"] == "names-v1" and first["usage"]["prompt_tokens"] == 11
    report = summarize(load_events(str(events)), str(events), "names-v1")
    by_arm = {a.arm: a for a in report.arms}
    assert by_arm["treatment"].requests == treated and by_arm["treatment"].applied_rate == 1.0
    assert by_arm["control"].reasons == {"control-arm": 1000 - treated}


def test_arms_are_sticky_across_restarts_with_the_same_salt(start_proxy: StartProxy) -> None:
    users = [f"sticky-{i}" for i in range(60)]
    first = start_proxy(ab_treatment_percent=50, ab_salt="keep")
    before = arms_of(first, users)
    first.stop()
    assert set(before.values()) == {"treatment", "control"}
    assert arms_of(start_proxy(ab_treatment_percent=50, ab_salt="keep"), users) == before
    assert arms_of(start_proxy(ab_treatment_percent=50, ab_salt="reshuffle"), users) != before


def test_the_header_user_and_the_api_key_are_sticky_too(start_proxy: StartProxy) -> None:
    proxy = start_proxy(ab_treatment_percent=50)
    client = sdk(proxy)
    by_body = [ask(client, f"who-{i}").headers["x-bpo-arm"] for i in range(20)]
    by_header = [ask(client, headers={"X-BPO-User": f"who-{i}"}).headers["x-bpo-arm"] for i in range(20)]
    assert by_body == by_header
    for key in ("sk-one", "sk-two", "sk-three"):
        keyed = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
        assert len({ask(keyed).headers["x-bpo-arm"] for _ in range(5)}) == 1


def test_ramping_from_10_to_50_percent_keeps_earlier_treatment_users(start_proxy: StartProxy) -> None:
    users = [f"ramp-{i}" for i in range(200)]
    at_10 = {u for u, a in arms_of(start_proxy(ab_treatment_percent=10, ab_salt="r"), users).items()
             if a == "treatment"}
    at_50 = {u for u, a in arms_of(start_proxy(ab_treatment_percent=50, ab_salt="r"), users).items()
             if a == "treatment"}
    assert at_10 and at_10 < at_50 and len(at_50) > 2 * len(at_10)


def test_x_bpo_overrides_the_arm_and_stays_out_of_arm_statistics(
        upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(ab_treatment_percent=50, events=f"jsonl:{events}")
    client = sdk(proxy)
    arms = arms_of(proxy, [f"o-{i}" for i in range(20)])
    treated = next(u for u, a in arms.items() if a == "treatment")
    control = next(u for u, a in arms.items() if a == "control")
    off = ask(client, treated, {"X-BPO": "off"})
    assert (off.headers["x-bpo-arm"], off.headers["x-bpo-applied"], off.headers["x-bpo-reason"]) == (
        "control", "false", "disabled")
    assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"] == PROMPT
    on = ask(client, control, {"X-BPO": "aggressive"})
    assert (on.headers["x-bpo-arm"], on.headers["x-bpo-applied"]) == ("treatment", "true")
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, control, {"X-BPO": "sometimes"})
    assert caught.value.body["param"] == "X-BPO"  # type: ignore[index]

    samples = scrape(proxy)
    assert sample(samples, "bpo_requests_total", arm="override", applied="false", reason="disabled",
                  route="chat") == 1
    assert sample(samples, "bpo_requests_total", arm="override", applied="true", reason="", route="chat") == 1
    assert sample(samples, "bpo_requests_total", arm="treatment", applied="true", reason="", route="chat") == sum(
        a == "treatment" for a in arms.values())
    proxy.stop()
    overrides = [e for e in read_jsonl(events) if e["override"]]
    assert [(e["arm"], e["mode"], e["applied"]) for e in overrides] == [
        ("control", "stable", False), ("treatment", "aggressive", True)]
    report = summarize(load_events(str(events)), "e")
    assert {a.arm: a.requests for a in report.arms}["override"] == 2


def test_no_arm_header_without_a_split(client: openai.OpenAI) -> None:
    assert "x-bpo-arm" not in ask(client, "someone").headers


def test_streamed_usage_is_counted_per_arm(start_proxy: StartProxy) -> None:
    proxy = start_proxy(ab_treatment_percent=100)
    stream = sdk(proxy).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True}, user="streamer")
    assert [c for c in stream][-1].usage is not None
    assert sample(scrape(proxy), "bpo_upstream_tokens_total", arm="treatment", kind="prompt") == 11


def post_feedback(proxy: RunningProxy, body: Any) -> httpx.Response:
    return httpx.post(proxy.base_url + "/bpo/feedback", json=body)


def test_feedback_joins_its_request_in_metrics_events_and_the_report(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(ab_treatment_percent=50, events=f"jsonl:{events}")
    client = sdk(proxy)
    requests = {}
    for i in range(30):
        raw = ask(client, f"fb-{i}")
        requests[raw.headers["x-request-id"]] = raw.headers["x-bpo-arm"]
    for request_id, arm in requests.items():
        answer = post_feedback(proxy, {"request_id": request_id, "score": 1 if arm == "treatment" else 0})
        assert answer.status_code == 200 and answer.json()["arm"] == arm
        assert answer.json()["recorded"] is True
    # One process with events of its own has served every request that could be rated: a typo is a 404.
    unknown = post_feedback(proxy, {"request_id": "req_typo", "score": 5, "comment": "great"})
    assert unknown.status_code == 404
    assert (unknown.json()["error"]["code"], unknown.json()["error"]["param"]) == ("unknown_request_id", "request_id")

    samples = scrape(proxy)
    treated = sum(a == "treatment" for a in requests.values())
    assert sample(samples, "bpo_feedback_total", arm="treatment") == treated
    assert sample(samples, "bpo_feedback_total", arm="control") == 30 - treated
    assert sample(samples, "bpo_feedback_total", arm="unknown") == 0
    proxy.stop()
    feedback = [e for e in read_jsonl(events) if e["type"] == "feedback"]
    assert len(feedback) == 30 and "req_typo" not in {e["request_id"] for e in feedback}
    report = summarize(load_events(f"jsonl:{events}"), "e", experiment="default")
    by_arm = {a.arm: a.feedback for a in report.arms}
    assert (by_arm["treatment"].count, by_arm["treatment"].mean) == (treated, 1.0)
    assert (by_arm["control"].count, by_arm["control"].mean) == (30 - treated, 0.0)
    assert report.comparison is not None and report.comparison.p_value < 1e-6


def test_feedback_without_an_events_sink_says_it_was_not_recorded(start_proxy: StartProxy) -> None:
    proxy = start_proxy(ab_treatment_percent=50, events="none")
    request_id = ask(sdk(proxy), "rated").headers["x-request-id"]
    answer = post_feedback(proxy, {"request_id": request_id, "score": 1})
    assert answer.status_code == 200 and answer.json()["recorded"] is False  # only the counter has it
    assert sum(sample(scrape(proxy), "bpo_feedback_total", arm=arm) for arm in ("treatment", "control")) == 1


@pytest.mark.parametrize(("body", "param"), [
    ({"score": 1}, "request_id"), ({"request_id": "r", "score": "good"}, "score"),
    ({"request_id": "r", "score": 1, "comment": ["x"]}, "comment")])
def test_malformed_feedback_is_a_400_in_openai_shape(proxy: RunningProxy, body: Any, param: str) -> None:
    answer = post_feedback(proxy, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    not_json = httpx.post(proxy.base_url + "/bpo/feedback", content=b"{oops")
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture
def stream_spec() -> Iterator[str]:
    name = f"bpo-test-ab-{uuid.uuid4().hex[:12]}"
    yield f"redis://127.0.0.1:6379/0?stream={name}"
    client = redis.Redis()
    client.delete(name)
    client.close()


def test_events_to_a_redis_stream_feed_the_report(start_proxy: StartProxy, stream_spec: str) -> None:
    proxy = start_proxy(ab_treatment_percent=50, events=stream_spec)
    client = sdk(proxy)
    ids = [ask(client, f"rs-{i}").headers["x-request-id"] for i in range(10)]
    for request_id in ids:
        assert post_feedback(proxy, {"request_id": request_id, "score": 4}).status_code == 200
    # Replicas share the stream: an id this one never saw may be another's, so it is accepted and recorded.
    foreign = post_feedback(proxy, {"request_id": "req_from_another_replica", "score": 5})
    assert foreign.status_code == 200 and (foreign.json()["arm"], foreign.json()["recorded"]) == ("unknown", True)
    proxy.stop()
    report = summarize(load_events(stream_spec), stream_spec)
    assert sum(a.requests for a in report.arms) == 10
    assert sum(a.feedback.count for a in report.arms) == 11 and report.malformed_lines == 0  # the foreign one too
