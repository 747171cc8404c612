"""``GET /dashboard``: the A/B report and the recent rewrites as a page, behind the admin key.

The numbers are ``bpo ab report``'s, computed by the same code (``proxy.report.summarize`` over the events
sink), so every replica that reads the same sink shows the same picture.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.dashboard_render import STYLESHEET, render_login, render_page
from proxy.report import Report, summarize
from proxy.report_source import EventStream, ReportError, open_events
from proxy.settings import Settings

COOKIE = "bpo_dashboard"
WINDOWS = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "all": None}
DEFAULT_WINDOW = "24h"
RECENT_REWRITES = 50
FILTERS = ("arm", "model", "reason")
MAX_LOGIN_BODY = 4096
# No inline script or style anywhere: a prompt that slips past escaping still cannot run.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass
class Recent:
    """The window's latest request events that carry prompt text, matching the page's filters."""

    filters: dict[str, str]
    rewrites: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REWRITES))
    choices: dict[str, set[str]] = field(default_factory=lambda: {name: set() for name in FILTERS})

    def add(self, event: dict[str, Any]) -> None:
        if event.get("type") != "request" or not isinstance(event.get("prompt"), str):
            return
        values = {name: str(event.get(name) or "none") for name in FILTERS}
        for name, value in values.items():
            self.choices[name].add(value)
        if all(self.filters.get(name) in (None, "", value) for name, value in values.items()):
            self.rewrites.append(event)


class Windowed:
    """The sink's events since ``since`` (events without a time are kept), feeding ``Recent`` on the way."""

    def __init__(self, stream: EventStream, since: float | None, recent: Recent | None) -> None:
        self.stream, self.since, self.recent = stream, since, recent

    @property
    def malformed(self) -> int:
        return self.stream.malformed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for event in self.stream:
            when = event.get("time")
            if self.since is not None and isinstance(when, (int, float)) and when < self.since:
                continue
            if self.recent is not None:
                self.recent.add(event)
            yield event


@dataclass(frozen=True)
class View:
    """What one page shows: the report, the rewrites, and the choices it was asked for."""

    report: Report | None
    error: str | None
    window: str
    filters: dict[str, str]
    recent: Recent | None
    include_text: bool


def read_view(events: str, window: str, filters: dict[str, str], include_text: bool,
              now: float | None = None) -> View:
    """Reads the whole sink once (blocking: call it off the event loop)."""
    if events == "none":
        return View(None, "No events sink is configured: start the gateway with --events jsonl:PATH or a "
                          "Redis stream.", window, filters, None, include_text)
    seconds = WINDOWS[window]
    since = None if seconds is None else (now if now is not None else time.time()) - seconds
    recent = Recent(filters) if include_text else None
    try:
        report = summarize(Windowed(open_events(events), since, recent), _source_label(events))
    except ReportError:
        return View(None, "The events sink cannot be read right now.", window, filters, recent, include_text)
    return View(report, None, window, filters, recent, include_text)


def _source_label(events: str) -> str:
    """The sink without credentials: a Redis URL may carry a password."""
    if events.startswith(("redis://", "rediss://")):
        scheme, _, rest = events.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return events


# -- access ------------------------------------------------------------------------------------------


def session_token(admin_key: str) -> str:
    """The cookie's value: derived from the admin key, so the key itself is never stored in the browser."""
    return hmac.new(admin_key.encode(), b"bpo-dashboard-session", hashlib.sha256).hexdigest()


def _key_matches(candidate: str, admin_key: str) -> bool:
    return hmac.compare_digest(candidate.strip().encode(), admin_key.encode())


def _authorized(request: Request, admin_key: str) -> bool:
    cookie = request.cookies.get(COOKIE, "")
    if cookie and hmac.compare_digest(cookie.encode(), session_token(admin_key).encode()):
        return True
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip()) and _key_matches(key, admin_key)


def _signed_in(request: Request, admin_key: str, location: str) -> Response:
    response = RedirectResponse(location, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, session_token(admin_key), path="/dashboard", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


def _login_page(status: int, message: str | None) -> Response:
    return HTMLResponse(render_login(message), status_code=status, headers=SECURITY_HEADERS)


# -- routes ------------------------------------------------------------------------------------------


def dashboard_routes(settings: Settings) -> list[BaseRoute]:
    """The dashboard's routes, or none without an admin key (then ``/dashboard`` is a 404, like ``/admin``)."""
    admin_key = settings.admin_key
    if not admin_key:
        return []

    async def page(request: Request) -> Response:
        params = request.query_params
        if "key" in params:  # sign in from a link, then drop the key from the address bar
            if not _key_matches(params["key"], admin_key):
                return _login_page(403, "That admin key is not valid.")
            rest = urlencode([(k, v) for k, v in params.multi_items() if k != "key"])
            return _signed_in(request, admin_key, "/dashboard" + (f"?{rest}" if rest else ""))
        if not _authorized(request, admin_key):
            return _login_page(401, None)
        window = params.get("window", DEFAULT_WINDOW)
        if window not in WINDOWS:
            window = DEFAULT_WINDOW
        filters = {name: params[name] for name in FILTERS if params.get(name)}
        view = await run_in_threadpool(read_view, settings.events, window, filters, settings.events_include_text)
        return HTMLResponse(render_page(view), headers=SECURITY_HEADERS)

    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_LOGIN_BODY:
            return _login_page(413, "The form is too large.")
        fields = parse_qs(body.decode("utf-8", "replace"))
        if not _key_matches((fields.get("key") or [""])[0], admin_key):
            return _login_page(403, "That admin key is not valid.")
        return _signed_in(request, admin_key, "/dashboard")

    async def stylesheet(request: Request) -> Response:
        return Response(STYLESHEET, media_type="text/css", headers={"cache-control": "max-age=300"})

    return [Route("/dashboard", page, methods=["GET"]), Route("/dashboard/login", login, methods=["POST"]),
            Route("/dashboard/dashboard.css", stylesheet, methods=["GET"])]

