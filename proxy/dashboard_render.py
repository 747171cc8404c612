"""The dashboard's HTML: server-rendered, every untrusted string through ``html.escape``, no inline script."""

from __future__ import annotations

import difflib
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from proxy.report import VERDICTS, Report
from proxy.report_render import ci_text, comparison_line, number_text, percent_text

if TYPE_CHECKING:
    from proxy.dashboard import Recent, View

REFRESH_SECONDS = 30

STYLESHEET = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
td.prompt { text-align: left; white-space: pre-wrap; max-width: 42em; font-family: ui-monospace, monospace; }
del { background: #fdd; text-decoration: line-through; } ins { background: #dfd; text-decoration: none; }
.note { color: #8a5a00; } .error { color: #b00020; } .muted { color: #666; }
form.filters { margin: .6em 0; } form.filters label { margin-right: 1em; }
"""


def _page(title: str, body: str, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="/dashboard/dashboard.css"></head><body>{body}</body></html>')


def render_login(message: str | None) -> str:
    """The sign-in form; the key goes in a POST body, never in the page or the address bar."""
    notice = f'<p class="error">{escape(message)}</p>' if message else ""
    return _page("bpo dashboard: sign in", (
        f'<h1>bpo dashboard</h1>{notice}<form method="post" action="/dashboard/login">'
        '<label>Admin key <input type="password" name="key" autocomplete="current-password"></label> '
        '<button type="submit">Sign in</button></form>'))


def render_page(view: View) -> str:
    parts = [f"<h1>bpo dashboard</h1>{_window_form(view)}"]
    if view.error:
        parts.append(f'<p class="error">{escape(view.error)}</p>')
    if view.report is not None:
        parts.append(_report_html(view.report))
    parts.append(_rewrites_html(view))
    return _page("bpo dashboard", "".join(parts), refresh=True)


def _window_form(view: View) -> str:
    from proxy.dashboard import WINDOWS

    hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in view.filters.items())
    return (f'<form class="filters" method="get" action="/dashboard">{hidden}<label>window '
            f'{_select("window", list(WINDOWS), view.window, blank=False)}</label>'
            f'<button type="submit">show</button> <span class="muted">refreshes every {REFRESH_SECONDS} s'
            f"</span></form>")


def _select(name: str, options: list[str], chosen: str | None, blank: bool = True) -> str:
    items = ['<option value="">all</option>'] if blank else []
    for option in options:
        selected = " selected" if option == chosen else ""
        items.append(f'<option value="{escape(option)}"{selected}>{escape(option)}</option>')
    return f'<select name="{escape(name)}">{"".join(items)}</select>'


def _report_html(report: Report) -> str:
    notes = "".join(f'<p class="note">note: {escape(n)}</p>' for n in report.notes)
    if report.malformed_lines:
        notes += f'<p class="note">skipped {report.malformed_lines} malformed event(s)</p>'
    source = f'<p class="muted">events: {escape(report.source)}'
    if report.experiments:
        source += f" (experiments: {escape(', '.join(report.experiments))})"
    return (f"{source}</p>{notes}{_arms_table(report)}{_feedback_table(report)}"
            f'<p id="verdict">{escape(comparison_line(report))}</p>{_shadow_table(report)}')


def _table(table_id: str, caption: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th class="{"text" if i == 0 else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i == 0 else ""}">{escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<h2>{escape(caption)}</h2><table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _arms_table(report: Report) -> str:
    rows = [[arm.arm, str(arm.requests), str(arm.errors), percent_text(arm.applied_rate),
             ", ".join(f"{reason} {count}" for reason, count in arm.reasons.items()) or "-",
             f"{number_text(arm.latency_ms.p50)} / {number_text(arm.latency_ms.p95)}",
             f"{number_text(arm.overhead_ms.p50, 2)} / {number_text(arm.overhead_ms.p95, 2)}",
             f"{arm.tokens.prompt} / {arm.tokens.completion}", number_text(arm.tokens.mean_total)]
            for arm in report.arms]
    return _table("arms", "Requests by arm (override = X-BPO decided, kept out of the comparison)",
                  ["arm", "requests", "errors", "applied", "not applied", "latency ms p50 / p95",
                   "overhead ms p50 / p95", "tokens in / out", "tokens / request"], rows)


def _feedback_table(report: Report) -> str:
    rows = [[arm.arm, str(arm.feedback.count), number_text(arm.feedback.mean, 3),
             ci_text(arm.feedback.interval, digits=3)] for arm in report.arms if arm.feedback.count]
    return _table("feedback", f"Feedback ({report.feedback_scale} scores, last score per request)",
                  ["arm", "count", "mean", "95% CI"], rows)


def _shadow_table(report: Report) -> str:
    shadow = report.shadow
    rows = [[verdict, str(shadow.counts[verdict]), percent_text(shadow.rates[verdict]),
             ci_text(shadow.intervals[verdict], percent=True)] for verdict in VERDICTS]
    rows.append(["win - loss", "", percent_text(shadow.net_win_rate), ci_text(shadow.net_interval, percent=True)])
    return _table("shadow", f"Shadow judge: treatment vs control ({shadow.judged} judged, {shadow.errors} failed)",
                  ["verdict", "count", "rate", "95% CI"], rows)


def _rewrites_html(view: View) -> str:
    if not view.include_text or view.recent is None:
        return ('<h2>Recent rewrites</h2><p class="muted">Start the gateway with --events-include-text to see the '
                "prompts before and after optimization here.</p>")
    recent = view.recent
    rows = [_rewrite_row(event) for event in reversed(recent.rewrites)]
    empty = '<tr><td colspan="6" class="text muted">no request with prompt text in this window</td></tr>'
    return (f"<h2>Recent rewrites (latest {len(rows)})</h2>{_filter_form(view, recent)}"
            '<table id="rewrites"><tr><th class="text">arm</th><th class="text">model</th><th>cache</th>'
            '<th class="text">guard / reason</th><th class="text">original</th><th class="text">optimized</th></tr>'
            f"{''.join(rows) or empty}</table>")


def _filter_form(view: View, recent: Recent) -> str:
    selects = "".join(f"<label>{name} {_select(name, sorted(recent.choices[name]), view.filters.get(name))}</label>"
                      for name in ("arm", "model", "reason"))
    clear = f'<a href="/dashboard?{urlencode({"window": view.window})}">clear</a>'
    return (f'<form class="filters" method="get" action="/dashboard">'
            f'<input type="hidden" name="window" value="{escape(view.window)}">{selects}'
            f'<button type="submit">filter</button> {clear}</form>')


def _rewrite_row(event: dict[str, Any]) -> str:
    original = str(event.get("prompt") or "")
    optimized = event.get("optimized_prompt")
    guard = "accepted" if event.get("applied") is True else str(event.get("reason") or "not applied")
    if event.get("applied") is True and isinstance(optimized, str):
        before, after = word_diff(original, optimized)
    else:
        before, after = escape(original), '<span class="muted">(sent as written)</span>'
    cells = [escape(str(event.get(name) or "none")) for name in ("arm", "model", "cache")]
    return (f'<tr class="rewrite"><td class="text">{cells[0]}</td><td class="text">{cells[1]}</td><td>{cells[2]}</td>'
            f'<td class="text">{escape(guard)}</td><td class="prompt original">{before}</td>'
            f'<td class="prompt optimized">{after}</td></tr>')


def word_diff(original: str, optimized: str) -> tuple[str, str]:
    """Both texts as escaped HTML, the words only in the original in ``<del>``, the new ones in ``<ins>``."""
    old, new = original.split(), optimized.split()
    before: list[str] = []
    after: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        removed, added = escape(" ".join(old[i1:i2])), escape(" ".join(new[j1:j2]))
        if tag == "equal":
            before.append(removed)
            after.append(added)
            continue
        if removed:
            before.append(f"<del>{removed}</del>")
        if added:
            after.append(f"<ins>{added}</ins>")
    return " ".join(before), " ".join(after)
