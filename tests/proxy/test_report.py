"""``bpo ab report`` on fixed event files, checked against values computed by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import stats
from proxy.cli import main
from proxy.report import load_events, summarize
from tests.fakes.proxy_server import REPO

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"
BINARY = FIXTURES / "binary_feedback.jsonl"
RATINGS = FIXTURES / "rating_feedback.jsonl"


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["ab", "report", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def arm(report: dict, name: str) -> dict:
    return next(a for a in report["arms"] if a["arm"] == name)


def test_malformed_lines_are_skipped_and_counted() -> None:
    loaded = load_events(f"jsonl:{BINARY}")
    # not JSON, unknown type, not an object, a non-numeric score, a line cut off mid-write; blanks are fine
    assert loaded.malformed == 5
    assert sum(1 for e in loaded.events if e["type"] == "request") == 11


def test_per_arm_traffic_figures_match_hand_computed_values(capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys, "--events", str(BINARY), "--experiment", "exp-1")
    treatment, control = arm(report, "treatment"), arm(report, "control")
    assert report["malformed_lines"] == 5 and report["experiments"] == ["exp-1", "exp-2"]
    assert (treatment["requests"], treatment["applied"], treatment["applied_rate"]) == (5, 4, 0.8)
    assert treatment["reasons"] == {"timeout": 1} and control["reasons"] == {"control-arm": 4}
    # latencies 100, 120, 140, 160, 400: p50 = 140; p95 at rank 3.8 = 160 + 0.8 * 240 = 352
    assert treatment["latency_ms"] == {"p50": 140.0, "p95": pytest.approx(352.0)}
    # 90, 110, 130, 150: p50 = (110 + 130) / 2; p95 at rank 2.85 = 130 + 0.85 * 20
    assert control["latency_ms"] == {"p50": 120.0, "p95": pytest.approx(147.0)}
    # overheads 2, 4, 6, 8, 10: p95 at rank 3.8 = 8 + 0.8 * 2
    assert treatment["overhead_ms"] == {"p50": 6.0, "p95": pytest.approx(9.6)}
    # four treatment requests carry usage 10/20/30, the timed-out one none
    assert treatment["tokens"] == {"prompt": 40, "completion": 80, "total": 120, "requests_with_usage": 4,
                                   "mean_total": 30.0}
    assert control["tokens"]["total"] == 100 and control["tokens"]["mean_total"] == 25.0
    assert arm(report, "override")["requests"] == 1  # X-BPO traffic: shown, never compared


def test_binary_feedback_gets_wilson_intervals_and_a_two_proportion_z_test(
        capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys, "--events", f"jsonl:{BINARY}", "--experiment", "exp-1")
    treatment, control = arm(report, "treatment")["feedback"], arm(report, "control")["feedback"]
    # t1 first scored 0 then 1: the last score counts. Treatment 4/5, control 2/4.
    assert (treatment["count"], treatment["mean"]) == (5, 0.8)
    assert (control["count"], control["mean"]) == (4, 0.5)
    # Wilson 4/5 by hand: centre (0.8 + 1.96²/10) / (1 + 1.96²/5) = 0.66966,
    # half-width 1.96 * sqrt(0.032 + 1.96²/100) / (1 + 1.96²/5) = 0.29413
    assert treatment["interval"]["low"] == pytest.approx(0.37553, abs=2e-4)
    assert treatment["interval"]["high"] == pytest.approx(0.96379, abs=2e-4)
    comparison = report["comparison"]
    assert report["feedback_scale"] == "binary" and comparison["test"] == "two-proportion z-test"
    # pooled p = 6/9; se = sqrt(6/9 * 3/9 * (1/5 + 1/4)) = sqrt(0.1); z = 0.3 / 0.316228 = 0.948683;
    # p = 2 * (1 - Phi(0.9487)) = 2 * (1 - 0.82861) = 0.34278
    assert comparison["difference"] == pytest.approx(0.3)
    assert comparison["statistic"] == pytest.approx(0.948683, abs=1e-6)
    assert comparison["p_value"] == pytest.approx(0.34278, abs=1e-4)
    # unpooled se = sqrt(0.8*0.2/5 + 0.5*0.5/4) = sqrt(0.0945) = 0.307409
    assert comparison["interval"]["low"] == pytest.approx(0.3 - 1.959964 * 0.307409, abs=1e-5)


def test_numeric_ratings_get_welch_t_test_checked_by_independent_integration(
        capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys, "--events", str(RATINGS))
    treatment = arm(report, "treatment")["feedback"]
    # ratings 5,4,4,3,5: mean 4.2, variance 2.8/4 = 0.7; t(0.975, 4) = 2.776445 (tables)
    half = 2.776445 * math.sqrt(0.7 / 5)
    assert treatment["interval"]["low"] == pytest.approx(4.2 - half, abs=1e-5)
    assert treatment["interval"]["high"] == pytest.approx(4.2 + half, abs=1e-5)
    comparison = report["comparison"]
    assert report["feedback_scale"] == "numeric" and comparison["test"] == "Welch's t-test"
    # control 3,4,2,3: mean 3, variance 2/3. se² = 0.7/5 + (2/3)/4 = 0.306667
    se = math.sqrt(0.7 / 5 + (2 / 3) / 4)
    df = se**4 / ((0.7 / 5) ** 2 / 4 + ((2 / 3) / 4) ** 2 / 3)
    assert comparison["statistic"] == pytest.approx(1.2 / se, abs=1e-9)  # 2.16694
    assert comparison["df"] == pytest.approx(df) and df == pytest.approx(6.6419, abs=1e-3)
    assert comparison["p_value"] == pytest.approx(two_sided_p_by_simpson(1.2 / se, df), abs=1e-7)
    assert 0.05 < comparison["p_value"] < 0.1  # promising, not significant at n = 9


def two_sided_p_by_simpson(t: float, df: float, steps: int = 20_000) -> float:
    """Integrate Student's t density from 0 to |t| with Simpson's rule: an independent reference."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = abs(t) / steps
    area = density(0) + density(abs(t)) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 1.0 - 2.0 * area * h / 3


def test_shadow_verdicts_get_rates_and_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    shadow = report_json(capsys, "--events", str(BINARY), "--experiment", "exp-1")["shadow"]
    assert (shadow["judged"], shadow["errors"]) == (10, 1)
    assert shadow["counts"] == {"win": 5, "tie": 3, "loss": 2}
    assert shadow["rates"] == {"win": 0.5, "tie": 0.3, "loss": 0.2}
    # Wilson 5/10: centre 0.5, half 1.96 * sqrt(0.025 + 1.96²/400) / (1 + 1.96²/10) = 0.26340
    assert shadow["intervals"]["win"]["low"] == pytest.approx(0.23659, abs=2e-4)
    # net = 0.5 - 0.2 = 0.3; var = (0.5 + 0.2 - 0.09) / 10 = 0.061
    assert shadow["net_win_rate"] == pytest.approx(0.3)
    assert shadow["net_interval"]["high"] == pytest.approx(0.3 + 1.959964 * math.sqrt(0.061), abs=1e-5)


def test_without_an_experiment_filter_all_events_pool_and_a_note_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys, "--events", str(BINARY))
    assert arm(report, "treatment")["requests"] == 6
    assert arm(report, "treatment")["feedback"]["count"] == 6  # x1 of exp-2 joins too
    assert arm(report, "unknown")["feedback"]["count"] == 1  # feedback whose request lives elsewhere
    assert report["shadow"]["counts"]["loss"] == 3
    assert any("2 experiments" in note for note in report["notes"])


def test_the_table_and_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ab.png"
    assert main(["ab", "report", "--events", str(BINARY), "--experiment", "exp-1", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("skipped 5 malformed", "treatment", "control", "two-proportion z-test", "p = 0.3428",
                     "not significant", "Shadow judge", "50.0%"):
        assert expected in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_an_unreadable_sink_is_an_error_exit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["ab", "report", "--events", f"jsonl:{tmp_path}/none.jsonl"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_an_empty_sink_reports_no_comparison() -> None:
    report = summarize(load_events(str(FIXTURES / "empty.jsonl")), "empty")
    assert report.arms == [] and report.comparison is None and report.shadow.judged == 0
    assert report.to_json()["shadow"]["net_win_rate"] is None


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706205), (2, 4.302653), (5, 2.570582),
                                               (10, 2.228139), (30, 2.042272), (1000, 1.962339)])
def test_t_quantiles_match_the_printed_tables(df: int, quantile: float) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=2e-6)
    assert stats.t_cdf(quantile, df) == pytest.approx(0.975, abs=1e-7)  # table rounding


def test_zero_variance_samples_do_not_divide_by_zero() -> None:
    same = stats.welch_t_test([4, 4, 4], [4, 4])
    assert same is not None and (same.difference, same.p_value) == (0, 1.0)
    apart = stats.welch_t_test([5, 5, 5], [3, 3])
    assert apart is not None and apart.p_value == 0.0 and math.isinf(apart.statistic)
    assert stats.two_proportion_z_test(3, 3, 2, 2) is not None
    assert stats.welch_t_test([1.0], [2.0, 3.0]) is None and stats.mean_interval([1.0]) is None


LONG_ARMS = ("treatment-with-a-very-long-experiment-arm-name-v2", "control-baseline-arm-of-the-long-experiment")


def write_requests(path: Path, arms: tuple[str, ...], per_arm: int) -> Path:
    with path.open("w") as events:
        for index in range(per_arm * len(arms)):
            events.write(json.dumps({"type": "request", "request_id": f"r{index}", "arm": arms[index % len(arms)],
                                     "applied": True, "status": 200, "latency_ms": 10, "overhead_ms": 1}) + "\n")
    return path


def test_piped_tables_keep_whole_arm_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = write_requests(tmp_path / "events.jsonl", LONG_ARMS, 3)
    assert main(["ab", "report", "--events", f"jsonl:{events}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "-arm" in line]
    assert len(rows) == 2 and all(any(name in row for name in LONG_ARMS) for row in rows)
    assert "…" not in "".join(rows)  # no figure cut to fit an assumed 80-column screen


def test_a_reader_that_leaves_early_ends_the_report_quietly(tmp_path: Path) -> None:
    events = write_requests(tmp_path / "events.jsonl", tuple(f"arm-{i}" for i in range(2000)), 1)
    command = [sys.executable, "-m", "proxy", "ab", "report", "--events", f"jsonl:{events}", "--format", "json"]
    # `| head -c 0`: the reading end is closed before the report is written (the process is still importing).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_the_report_splits_by_client_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = []
    for index, (key, arm_name) in enumerate([("team-a", "treatment"), ("team-a", "control"),
                                             ("team-b", "treatment"), ("team-b", "treatment")]):
        lines.append({"type": "request", "request_id": f"r{index}", "time": 1.0, "experiment": "e", "arm": arm_name,
                      "override": False, "applied": arm_name == "treatment", "status": 200, "latency_ms": 10,
                      "overhead_ms": 1, "key_name": key})
        lines.append({"type": "feedback", "request_id": f"r{index}", "time": 2.0, "score": 1, "arm": arm_name})
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    team_b = report_json(capsys, "--events", str(events), "--key", "team-b")
    assert [(a["arm"], a["requests"]) for a in team_b["arms"]] == [("treatment", 2)]
    assert arm(team_b, "treatment")["feedback"]["count"] == 2
    team_a = report_json(capsys, "--events", str(events), "--key", "team-a")
    assert {a["arm"]: a["requests"] for a in team_a["arms"]} == {"treatment": 1, "control": 1}
    assert sum(a["requests"] for a in report_json(capsys, "--events", str(events))["arms"]) == 4
