"""What ``bpo eval`` shows: the win/tie/loss table per prompt set (rich) and a bar chart (matplotlib)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizer.judge import Tally, average_delta_wr


def console() -> Any:
    """A console that does not squeeze the table to 80 columns when the output is a file or a pipe."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, 150))


def results_table(tallies: Sequence[Tally], offline: dict[str, dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("set", "judged", "win", "tie", "loss", "invalid", "ΔWR", "len ratio", "copy", "guard ok",
                   "ref sim"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for t in tallies:
        extra = offline.get(t.name, {})
        table.add_row(t.name, str(t.judged), f"{t.percent(t.win):.1f}%", f"{t.percent(t.tie):.1f}%",
                      f"{t.percent(t.loss):.1f}%", str(t.invalid), f"{t.delta_wr:+.1f}",
                      *_offline_cells(extra))
    if len(tallies) > 1:
        table.add_row("average", "", "", "", "", "", f"{average_delta_wr(tallies):+.1f}", "", "", "", "")
    return table


def _offline_cells(metrics: dict[str, Any]) -> list[str]:
    if not metrics.get("count"):
        return ["", "", "", ""]
    similarity = metrics.get("reference_similarity")
    return [f"{metrics['length_ratio']:.2f}x", f"{100 * metrics['copy_rate']:.0f}%",
            f"{100 * metrics['guard_pass_rate']:.0f}%", "" if similarity is None else f"{similarity:.2f}"]


def plot_tallies(tallies: Sequence[Tally], path: str | Path, title: str) -> None:
    """A stacked horizontal bar per set: win (green), tie (grey), loss (red), in percent."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    names = [t.name for t in tallies]
    wins = [t.percent(t.win) for t in tallies]
    ties = [t.percent(t.tie) for t in tallies]
    losses = [t.percent(t.loss) for t in tallies]
    figure, axes = plt.subplots(figsize=(8, 2.0 + 0.6 * len(tallies)))
    axes.barh(names, wins, color="#2e7d32", label="win")
    axes.barh(names, ties, left=wins, color="#9e9e9e", label="tie")
    axes.barh(names, losses, left=[w + t for w, t in zip(wins, ties, strict=True)], color="#c62828",
              label="loss")
    for row, tally in enumerate(tallies):
        axes.text(101, row, f"ΔWR {tally.delta_wr:+.1f}", va="center")
    axes.set_xlim(0, 118)
    axes.set_xlabel("% of judged prompts (optimized vs original)")
    axes.set_title(textwrap.fill(title, 80), fontsize="medium")
    axes.invert_yaxis()
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize="small", frameon=False)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
