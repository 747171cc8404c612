"""``bpo ab report``: reads the events sink and tells whether the treatment arm beats control."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optimizer.judge import Tally
from proxy.report_source import Events, ReportError, is_number, load_events, open_events
from proxy.stats import (
    Z_95,
    Interval,
    TestResult,
    mean_interval,
    percentile,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)

__all__ = ["Report", "ReportError", "Summary", "load_events", "open_events", "register", "summarize"]

COMPARED_ARMS = ("treatment", "control")
VERDICTS = ("win", "tie", "loss")


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


# -- summarizing -------------------------------------------------------------------------------------


def arm_label(event: dict[str, Any]) -> str:
    """Overrides sit in their own row, outside the comparison; unsplit traffic is ``none``."""
    if event.get("override"):
        return "override"
    arm = event.get("arm")
    return arm if isinstance(arm, str) else "none"


@dataclass
class _ArmTally:
    """Running totals of one arm's requests: what is kept per event is two floats, not the event."""

    requests: int = 0
    errors: int = 0
    applied: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    tokens: Counter[str] = field(default_factory=Counter)
    with_usage: int = 0

    def add(self, event: dict[str, Any]) -> None:
        self.requests += 1
        status = event.get("status")
        self.errors += not (isinstance(status, int) and 200 <= status < 400)
        if event.get("applied") is True:
            self.applied += 1
        elif event.get("reason"):
            self.reasons[str(event["reason"])] += 1
        for key, values in (("latency_ms", self.latency), ("overhead_ms", self.overhead)):
            if is_number(event.get(key)):
                values.append(float(event[key]))
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.with_usage += 1
            for kind in ("prompt_tokens", "completion_tokens", "total_tokens"):
                if is_number(usage.get(kind)):
                    self.tokens[kind] += int(usage[kind])


class Summary:
    """Folds a stream of events into a :class:`Report`, holding only what the statistics need."""

    def __init__(self, experiment: str | None = None, key_name: str | None = None) -> None:
        self.experiment = experiment
        self.key_name = key_name  # only this client key's requests (events carry the key's name)
        self.experiments: set[str] = set()
        self.arms: dict[str, _ArmTally] = {}
        self.arm_of: dict[str, str] = {}
        self.feedback: dict[str, tuple[float, float, Any]] = {}  # request id -> (time, score, arm field)
        self.verdicts: Counter[str] = Counter()

    def add(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "request":
            self._add_request(event)
        elif kind == "feedback":
            self._add_feedback(event)
        elif ((self.experiment is None or event.get("experiment") == self.experiment)
              and (self.key_name is None or event.get("request_id") in self.arm_of)):
            self.verdicts[str(event.get("verdict"))] += 1

    def _add_request(self, event: dict[str, Any]) -> None:
        if event.get("experiment") is not None:
            self.experiments.add(str(event["experiment"]))
        if self.experiment is not None and event.get("experiment") != self.experiment:
            return
        if self.key_name is not None and event.get("key_name") != self.key_name:
            return
        arm = sys.intern(arm_label(event))
        self.arm_of[event["request_id"]] = arm
        tally = self.arms.get(arm)
        if tally is None:
            tally = self.arms[arm] = _ArmTally()
        tally.add(event)

    def _add_feedback(self, event: dict[str, Any]) -> None:
        """One score per request: the latest one sent for it (a user may change their mind)."""
        when = float(event["time"]) if is_number(event.get("time")) else 0.0
        previous = self.feedback.get(event["request_id"])
        if previous is None or when >= previous[0]:
            self.feedback[event["request_id"]] = (when, float(event["score"]), event.get("arm"))

    def report(self, source: str, malformed: int) -> Report:
        scores = self._scores()
        scale = _scale(scores)
        arms = [_arm_summary(arm, self.arms.get(arm, _ArmTally()), scores.get(arm, []), scale)
                for arm in _arm_order({*self.arms, *scores})]
        notes = []
        if self.experiment is None and len(self.experiments) > 1:
            notes.append(f"events from {len(self.experiments)} experiments are pooled; pick one with --experiment")
        return Report(source, sorted(self.experiments), malformed, arms, scale, _compare(scores, scale),
                      summarize_shadow(self.verdicts), notes)

    def _scores(self) -> dict[str, list[float]]:
        scores: dict[str, list[float]] = {}
        for request_id, (_, score, known) in self.feedback.items():
            arm = self.arm_of.get(request_id)
            if arm is None and (self.experiment is not None or self.key_name is not None):
                continue  # cannot tell which experiment (or key) it belongs to
            if arm is None:  # the request event lives elsewhere; trust the arm the receiving replica knew
                arm = known if isinstance(known, str) else "unknown"
            scores.setdefault(arm, []).append(score)
        return scores


def summarize(events: Events, source: str, experiment: str | None = None, key_name: str | None = None) -> Report:
    summary = Summary(experiment, key_name)
    for event in events:
        summary.add(event)
    return summary.report(source, events.malformed)


def _arm_order(arms: Iterable[str]) -> list[str]:
    fixed = ["treatment", "control", "none", "override", "unknown"]
    present = set(arms)
    return [a for a in fixed if a in present] + sorted(present - set(fixed))


def _scale(scores: dict[str, list[float]]) -> str:
    values = [s for arm in COMPARED_ARMS for s in scores.get(arm, [])]
    if not values:
        return "none"
    return "binary" if all(v in (0.0, 1.0) for v in values) else "numeric"


def _arm_summary(arm: str, tally: _ArmTally, scores: list[float], scale: str) -> ArmSummary:
    total = tally.tokens["total_tokens"]
    return ArmSummary(
        arm=arm,
        requests=tally.requests,
        errors=tally.errors,
        applied=tally.applied,
        applied_rate=tally.applied / tally.requests if tally.requests else None,
        reasons=dict(tally.reasons.most_common()),
        latency_ms=Spread(percentile(tally.latency, 50), percentile(tally.latency, 95)),
        overhead_ms=Spread(percentile(tally.overhead, 50), percentile(tally.overhead, 95)),
        tokens=Tokens(tally.tokens["prompt_tokens"], tally.tokens["completion_tokens"], total, tally.with_usage,
                      total / tally.with_usage if tally.with_usage else None),
        feedback=_feedback_summary(scores, scale),
    )


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


def summarize_shadow(verdicts: Mapping[str, int]) -> ShadowSummary:
    """Treatment's win/tie/loss rates with Wilson intervals; failed judgements are counted apart."""
    counts = {v: verdicts.get(v, 0) for v in VERDICTS}
    judged = sum(counts.values())
    rates = {v: counts[v] / judged if judged else None for v in VERDICTS}
    intervals = {v: wilson_interval(counts[v], judged) for v in VERDICTS}
    net, net_interval = None, None
    if judged:
        win, loss = counts["win"] / judged, counts["loss"] / judged
        net = Tally("shadow", counts["win"], counts["tie"], counts["loss"]).delta_wr / 100  # bpo eval's ΔWR
        # Variance of (win - loss) for one multinomial draw, over n draws.
        half = Z_95 * math.sqrt((win + loss - net * net) / judged)
        net_interval = Interval(net - half, net + half)
    return ShadowSummary(judged, sum(verdicts.values()) - judged, counts, rates, intervals, net, net_interval)


# -- command line ------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``bpo ab report`` to the ``bpo`` parser."""
    ab = subparsers.add_parser("ab", help="A/B experiments: per-arm summary of traffic and feedback")
    ab_commands = ab.add_subparsers(dest="ab_command", metavar="COMMAND", required=True)
    report = ab_commands.add_parser("report", help="per-arm summary of A/B traffic, feedback and shadow verdicts",
                                    description="Per-arm summary of A/B traffic, user feedback and shadow-judge "
                                                "verdicts, with a significance test of treatment vs control.")
    report.add_argument("--events", required=True, metavar="SINK",
                        help="where the proxy wrote events: jsonl:PATH (or PATH) | redis://HOST:PORT/DB[?stream=]")
    report.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    report.add_argument("--plot", metavar="OUT.png", help="also draw the per-arm comparison to this image")
    report.add_argument("--experiment", metavar="NAME", help="only this experiment's events")
    report.add_argument("--key", metavar="NAME", help="only the requests (and their feedback) of this client key")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = summarize(open_events(args.events), args.events, args.experiment, args.key)
    except ReportError as exc:
        print(f"bpo ab report: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2, allow_nan=False))
    else:
        from proxy.report_render import print_tables

        print_tables(report)
    if args.plot:
        from proxy.report_render import plot

        try:
            plot(report, args.plot)
        except ImportError:
            print("bpo ab report: --plot needs matplotlib: pip install 'bpo-proxy[plot]'", file=sys.stderr)
            return 2
    return 0
