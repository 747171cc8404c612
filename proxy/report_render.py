"""Drawing the A/B report: rich tables on the terminal and a matplotlib figure (both imported lazily)."""

from __future__ import annotations

import sys
from typing import Any

from proxy.report import COMPARED_ARMS, VERDICTS, Report
from proxy.stats import Interval

PIPED_WIDTH = 1000  # columns when stdout is not a terminal: wider than any table, so nothing is cut


def number_text(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def percent_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def ci_text(interval: Interval | None, percent: bool = False, digits: int = 2) -> str:
    if interval is None:
        return "-"
    if percent:
        return f"[{percent_text(interval.low)}, {percent_text(interval.high)}]"
    return f"[{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def print_tables(report: Report, console: Any = None) -> None:
    from rich.console import Console

    # Piped or redirected output has no screen to fit: rich would assume 80 columns and cut every cell to fit.
    console = console or Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
    title = f"A/B report: {report.source}"
    if report.experiments:
        title += f"  (experiments: {', '.join(report.experiments)})"
    console.print(f"[bold]{title}[/bold]")
    if report.malformed_lines:
        console.print(f"[yellow]skipped {report.malformed_lines} malformed line(s)[/yellow]")
    for note in report.notes:
        console.print(f"[yellow]note: {note}[/yellow]")
    console.print(_requests_table(report))
    console.print(_feedback_table(report))
    console.print(comparison_line(report))
    console.print(_shadow_table(report))


def _requests_table(report: Report) -> Any:
    from rich.table import Table

    table = Table(title="Requests by arm (override = X-BPO decided, kept out of the comparison)")
    _add_arm_column(table)
    for column in ("requests", "errors", "applied", "not applied", "latency ms\np50 / p95",
                   "overhead ms\np50 / p95", "tokens\nin / out", "tokens\n/ request"):
        table.add_column(column, justify="left" if column == "not applied" else "right")
    for arm in report.arms:
        reasons = "\n".join(f"{reason} {count}" for reason, count in arm.reasons.items()) or "-"
        table.add_row(arm.arm, str(arm.requests), str(arm.errors), percent_text(arm.applied_rate), reasons,
                      f"{number_text(arm.latency_ms.p50)} / {number_text(arm.latency_ms.p95)}",
                      f"{number_text(arm.overhead_ms.p50, 2)} / {number_text(arm.overhead_ms.p95, 2)}",
                      f"{arm.tokens.prompt} / {arm.tokens.completion}", number_text(arm.tokens.mean_total))
    return table


def _feedback_table(report: Report) -> Any:
    from rich.table import Table

    table = Table(title=f"Feedback ({report.feedback_scale} scores, last score per request)")
    _add_arm_column(table)
    for column in ("count", "mean", "95% CI"):
        table.add_column(column, justify="right")
    for arm in report.arms:
        if arm.feedback.count:
            table.add_row(arm.arm, str(arm.feedback.count), number_text(arm.feedback.mean, 3),
                          ci_text(arm.feedback.interval, digits=3))
    return table


def _add_arm_column(table: Any) -> None:
    """Arm names stay whole: on a narrow terminal a long one folds onto more lines instead of being cut."""
    table.add_column("arm", justify="left", overflow="fold")


def comparison_line(report: Report) -> str:
    test = report.comparison
    if test is None:
        return "treatment vs control: not enough feedback in both arms to compare"
    df = "" if test.df is None else f", df {test.df:.1f}"
    verdict = "significant at 5%" if test.p_value < 0.05 else "not significant at 5%"
    return (f"treatment - control = {test.difference:+.3f} {ci_text(test.interval, digits=3)} "
            f"({test.test}: statistic {test.statistic:.3f}{df}, p = {test.p_value:.4f}; {verdict})")


def _shadow_table(report: Report) -> Any:
    from rich.table import Table

    shadow = report.shadow
    table = Table(title=f"Shadow judge: treatment vs control ({shadow.judged} judged, {shadow.errors} failed)")
    for column in ("verdict", "count", "rate", "95% CI"):
        table.add_column(column, justify="left" if column == "verdict" else "right")
    for verdict in VERDICTS:
        table.add_row(verdict, str(shadow.counts[verdict]), percent_text(shadow.rates[verdict]),
                      ci_text(shadow.intervals[verdict], percent=True))
    table.add_row("win - loss", "", percent_text(shadow.net_win_rate), ci_text(shadow.net_interval, percent=True))
    return table


def plot(report: Report, path: str) -> None:
    """Four panels: feedback mean with CI, applied rate, latency p50/p95, shadow win/tie/loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    _plot_feedback(axes[0][0], report)
    _plot_applied(axes[0][1], report)
    _plot_latency(axes[1][0], report)
    _plot_shadow(axes[1][1], report)
    figure.suptitle(f"bpo A/B report: {report.source}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _compared(report: Report) -> list[Any]:
    return [a for a in report.arms if a.arm in COMPARED_ARMS] or list(report.arms)


def _plot_feedback(ax: Any, report: Report) -> None:
    arms = [a for a in _compared(report) if a.feedback.mean is not None]
    means = [a.feedback.mean for a in arms]
    errors = [[m - (a.feedback.interval.low if a.feedback.interval else m) for a, m in zip(arms, means, strict=True)],
              [(a.feedback.interval.high if a.feedback.interval else m) - m for a, m in zip(arms, means, strict=True)]]
    ax.bar([a.arm for a in arms], means, yerr=errors, capsize=8, color=["tab:green", "tab:gray"][:len(arms)])
    subtitle = ""
    if report.comparison is not None:
        subtitle = f"\n{report.comparison.test}: p = {report.comparison.p_value:.4f}"
    ax.set_title(f"feedback mean, 95% CI{subtitle}")


def _plot_applied(ax: Any, report: Report) -> None:
    arms = _compared(report)
    ax.bar([a.arm for a in arms], [100 * (a.applied_rate or 0) for a in arms], color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_title("prompts rewritten (%)")


def _plot_latency(ax: Any, report: Report) -> None:
    arms = _compared(report)
    positions = range(len(arms))
    ax.bar([p - 0.2 for p in positions], [a.latency_ms.p50 or 0 for a in arms], 0.4, label="p50")
    ax.bar([p + 0.2 for p in positions], [a.latency_ms.p95 or 0 for a in arms], 0.4, label="p95")
    ax.set_xticks(list(positions), [a.arm for a in arms])
    ax.set_title("end-to-end latency (ms)")
    ax.legend()


def _plot_shadow(ax: Any, report: Report) -> None:
    shadow = report.shadow
    left = 0.0
    colors = {"win": "tab:green", "tie": "tab:gray", "loss": "tab:red"}
    for verdict in VERDICTS:
        share = 100 * (shadow.rates[verdict] or 0)
        ax.barh(["treatment"], [share], left=left, color=colors[verdict], label=verdict)
        left += share
    ax.set_xlim(0, 100)
    ax.set_title(f"shadow judge verdicts (%), n = {shadow.judged}")
    ax.legend(loc="lower right")
