"""``bpo ab report``: reads the events sink and tells whether the treatment arm beats control."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from proxy.events import STREAM_FIELD, parse_redis_spec
from proxy.stats import (
    Interval,
    TestResult,
    mean_interval,
    percentile,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)

EVENT_TYPES = ("request", "feedback", "shadow")
COMPARED_ARMS = ("treatment", "control")
VERDICTS = ("win", "tie", "loss")


class ReportError(Exception):
    """The events cannot be read (missing file, unreachable Redis, bad spec)."""


@dataclass
class Loaded:
    events: list[dict[str, Any]]
    malformed: int = 0


@dataclass(frozen=True)
class Spread:
    p50: float | None
    p95: float | None


@dataclass(frozen=True)
class Tokens:
    prompt: int
    completion: int
    total: int
    requests_with_usage: int
    mean_total: float | None


@dataclass(frozen=True)
class FeedbackSummary:
    count: int
    mean: float | None
    interval: Interval | None


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    requests: int
    errors: int
    applied: int
    applied_rate: float | None
    reasons: dict[str, int]
    latency_ms: Spread
    overhead_ms: Spread
    tokens: Tokens
    feedback: FeedbackSummary


@dataclass(frozen=True)
class ShadowSummary:
    judged: int
    errors: int
    counts: dict[str, int]
    rates: dict[str, float | None]
    intervals: dict[str, Interval | None]
    net_win_rate: float | None  # win rate minus loss rate: the paper's ΔWR
    net_interval: Interval | None


@dataclass(frozen=True)
class Report:
    source: str
    experiments: list[str]
    malformed_lines: int
    arms: list[ArmSummary]
    feedback_scale: str  # "binary" | "numeric" | "none"
    comparison: TestResult | None
    shadow: ShadowSummary
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A plain dict; infinite statistics (zero variance) become null so the output is strict JSON."""
        return _finite(dataclasses.asdict(self))  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -- reading -----------------------------------------------------------------------------------------


def load_events(spec: str) -> Loaded:
    """``jsonl:PATH`` (or a bare path) or ``redis://HOST:PORT/DB[?stream=NAME]``."""
    if spec.startswith(("redis://", "rediss://")):
        return _parse_records(_read_redis(spec))
    path = Path(spec.removeprefix("jsonl:"))
    try:
        with path.open("rb") as lines:
            return _parse_records(lines)
    except OSError as exc:
        raise ReportError(f"--events {spec}: cannot read {path}: {exc.strerror}") from exc


def _read_redis(spec: str) -> Iterator[bytes]:
    import redis

    url, stream, _ = parse_redis_spec(spec)
    client: Any = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
    start = "-"
    try:
        while True:
            page: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream, min=start, max="+", count=1000)
            for _entry_id, fields in page:
                yield fields.get(STREAM_FIELD, b"")
            if len(page) < 1000:
                return
            start = "(" + page[-1][0].decode()
    except redis.RedisError as exc:
        raise ReportError(f"--events {spec}: cannot read the stream {stream!r}: {exc}") from exc
    finally:
        client.close()


def _parse_records(records: Iterable[bytes]) -> Loaded:
    loaded = Loaded([])
    for record in records:
        if not record.strip():
            continue
        event = _valid_event(record)
        if event is None:
            loaded.malformed += 1
        else:
            loaded.events.append(event)
    return loaded


def _valid_event(record: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        return None
    if not isinstance(event.get("request_id"), str):
        return None
    if event["type"] == "feedback" and not _is_number(event.get("score")):
        return None
    return event


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- summarizing -------------------------------------------------------------------------------------


def arm_label(event: dict[str, Any]) -> str:
    """Overrides sit in their own row, outside the comparison; unsplit traffic is ``none``."""
    if event.get("override"):
        return "override"
    arm = event.get("arm")
    return arm if isinstance(arm, str) else "none"


def summarize(loaded: Loaded, source: str, experiment: str | None = None) -> Report:
    requests = [e for e in loaded.events if e["type"] == "request"]
    experiments = sorted({str(e.get("experiment")) for e in requests if e.get("experiment") is not None})
    if experiment is not None:
        requests = [e for e in requests if e.get("experiment") == experiment]
    arm_of = {e["request_id"]: arm_label(e) for e in requests}
    scores = _feedback_by_arm(loaded.events, arm_of, joined_only=experiment is not None)
    scale = _scale(scores)
    arms = [_arm_summary(arm, [e for e in requests if arm_label(e) == arm], scores.get(arm, []), scale)
            for arm in _arm_order({*arm_of.values(), *scores})]
    shadows = [e for e in loaded.events if e["type"] == "shadow"
               and (experiment is None or e.get("experiment") == experiment)]
    notes = []
    if experiment is None and len(experiments) > 1:
        notes.append(f"events from {len(experiments)} experiments are pooled; pick one with --experiment")
    return Report(source, experiments, loaded.malformed, arms, scale, _compare(scores, scale),
                  summarize_shadow(shadows), notes)


def _feedback_by_arm(events: Sequence[dict[str, Any]], arm_of: dict[str, str],
                     joined_only: bool) -> dict[str, list[float]]:
    """One score per request: the last feedback sent for it (a user may change their mind)."""
    latest: dict[str, dict[str, Any]] = {}
    for event in sorted((e for e in events if e["type"] == "feedback"), key=lambda e: _time(e)):
        latest[event["request_id"]] = event
    scores: dict[str, list[float]] = {}
    for request_id, event in latest.items():
        arm = arm_of.get(request_id)
        if arm is None and joined_only:
            continue
        if arm is None:  # the request event lives elsewhere; trust the arm the receiving replica knew
            known = event.get("arm")
            arm = known if isinstance(known, str) else "unknown"
        scores.setdefault(arm, []).append(float(event["score"]))
    return scores


def _time(event: dict[str, Any]) -> float:
    value = event.get("time")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _arm_order(arms: Iterable[str]) -> list[str]:
    fixed = ["treatment", "control", "none", "override", "unknown"]
    present = set(arms)
    return [a for a in fixed if a in present] + sorted(present - set(fixed))


def _scale(scores: dict[str, list[float]]) -> str:
    values = [s for arm in COMPARED_ARMS for s in scores.get(arm, [])]
    if not values:
        return "none"
    return "binary" if all(v in (0.0, 1.0) for v in values) else "numeric"


def _arm_summary(arm: str, requests: list[dict[str, Any]], scores: list[float], scale: str) -> ArmSummary:
    applied = sum(1 for e in requests if e.get("applied") is True)
    reasons = Counter(str(e.get("reason")) for e in requests if e.get("applied") is not True and e.get("reason"))
    return ArmSummary(
        arm=arm,
        requests=len(requests),
        errors=sum(1 for e in requests if not _is_number(e.get("status")) or not 200 <= e["status"] < 400),
        applied=applied,
        applied_rate=applied / len(requests) if requests else None,
        reasons=dict(reasons.most_common()),
        latency_ms=_spread(requests, "latency_ms"),
        overhead_ms=_spread(requests, "overhead_ms"),
        tokens=_tokens(requests),
        feedback=_feedback_summary(scores, scale),
    )


def _spread(requests: list[dict[str, Any]], key: str) -> Spread:
    values = [float(e[key]) for e in requests if _is_number(e.get(key))]
    return Spread(percentile(values, 50), percentile(values, 95))


def _tokens(requests: list[dict[str, Any]]) -> Tokens:
    usages = [e["usage"] for e in requests if isinstance(e.get("usage"), dict)]

    def total(kind: str) -> int:
        return sum(int(u[kind]) for u in usages if _is_number(u.get(kind)))

    all_tokens = total("total_tokens")
    return Tokens(total("prompt_tokens"), total("completion_tokens"), all_tokens, len(usages),
                  all_tokens / len(usages) if usages else None)


def _feedback_summary(scores: list[float], scale: str) -> FeedbackSummary:
    if not scores:
        return FeedbackSummary(0, None, None)
    mean = sum(scores) / len(scores)
    if scale == "binary":
        return FeedbackSummary(len(scores), mean, wilson_interval(int(sum(scores)), len(scores)))
    return FeedbackSummary(len(scores), mean, mean_interval(scores))


def _compare(scores: dict[str, list[float]], scale: str) -> TestResult | None:
    treatment, control = scores.get("treatment", []), scores.get("control", [])
    if scale == "binary":
        return two_proportion_z_test(int(sum(treatment)), len(treatment), int(sum(control)), len(control))
    if scale == "numeric":
        return welch_t_test(treatment, control)
    return None


def summarize_shadow(events: Sequence[dict[str, Any]]) -> ShadowSummary:
    """Treatment's win/tie/loss rates with Wilson intervals; failed judgements are counted apart."""
    verdicts = Counter(e.get("verdict") for e in events)
    counts = {v: verdicts.get(v, 0) for v in VERDICTS}
    judged = sum(counts.values())
    rates = {v: counts[v] / judged if judged else None for v in VERDICTS}
    intervals = {v: wilson_interval(counts[v], judged) for v in VERDICTS}
    net, net_interval = None, None
    if judged:
        win, loss = counts["win"] / judged, counts["loss"] / judged
        net = win - loss
        # Variance of (win - loss) for one multinomial draw, over n draws.
        half = 1.959963984540054 * ((win + loss - net * net) / judged) ** 0.5
        net_interval = Interval(net - half, net + half)
    return ShadowSummary(judged, len(events) - judged, counts, rates, intervals, net, net_interval)


# -- command line ------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``bpo ab report`` to the ``bpo`` parser."""
    ab = subparsers.add_parser("ab", help="A/B experiments: per-arm summary of traffic and feedback")
    ab_commands = ab.add_subparsers(dest="ab_command", metavar="COMMAND", required=True)
    report = ab_commands.add_parser("report", help="per-arm summary of A/B traffic, feedback and shadow verdicts",
                                    description=__doc__)
    report.add_argument("--events", required=True, metavar="SINK",
                        help="where the proxy wrote events: jsonl:PATH (or PATH) | redis://HOST:PORT/DB[?stream=]")
    report.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    report.add_argument("--plot", metavar="OUT.png", help="also draw the per-arm comparison to this image")
    report.add_argument("--experiment", metavar="NAME", help="only this experiment's events")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_events(args.events)
    except ReportError as exc:
        print(f"bpo ab report: {exc}", file=sys.stderr)
        return 2
    report = summarize(loaded, args.events, args.experiment)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2, allow_nan=False))
    else:
        from proxy.report_render import print_tables

        print_tables(report)
    if args.plot:
        from proxy.report_render import plot

        plot(report, args.plot)
    return 0
