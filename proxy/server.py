"""The HTTP server: uvicorn's httptools protocol behind the gateway's connection limits.

uvicorn was kept by measurement (``bench/README.md``, "HTTP server"): its httptools protocol is the fastest
server here, but it has no bound on a request's headers (one 200 MB header kept a core busy for 92 s), no
time limit on a request that never completes, and no cap on open connections. ``GuardedHttpProtocol``
adds them where they cost nothing on a complete request: the byte and time checks run only when a request
spans several reads, so the fast path pays one comparison per read.

- Request line + headers over ``max_header_bytes``: 431, refused after at most one read past the bound.
- Headers not complete ``header_timeout`` seconds after the connection opened or the request began: 408
  (a connection that sent nothing is closed without an answer, as an idle keep-alive one is).
- Body not complete ``body_timeout`` seconds after the headers: 408 (or a close, when the app answered).
- More than ``max_connections`` open in this process: the new connection is answered 503 and closed.
- Idle keep-alive connections close after ``keep_alive_timeout``; a connection serves at most
  ``keep_alive_max_requests`` requests, the last one answered with ``Connection: close``.

Every refusal is written in OpenAI's error shape and followed by a short lingering close: the rest of what
the client sends is read and dropped for up to ``LINGER_SECONDS``, so that it reads the answer instead of
a connection reset.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.errors import error_body
from proxy.settings import Settings

log = logging.getLogger("bpo.server")

LINGER_SECONDS: Final = 1.0
MAX_LINGERING: Final = 1024  # refused connections draining at once; past it more are dropped without an answer
# Each client connection may hold one upstream connection besides, plus the process's own files.
FILES_PER_CONNECTION: Final = 2
SPARE_FILES: Final = 256

_IDLE, _HEADERS, _BODY = 0, 1, 2


@dataclass(frozen=True)
class ServerLimits:
    """The bounds a client connection lives within; see the module docstring."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    keep_alive_timeout: float
    keep_alive_max_requests: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerLimits:
        return cls(settings.max_header_bytes, settings.header_timeout, settings.body_timeout,
                   settings.max_connections, settings.keep_alive_timeout, settings.keep_alive_max_requests)


def error_reply(status: int, message: str, type_: str, code: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape that closes the connection."""
    body = error_body(status, message, type_, None, code)
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return STATUS_LINE[status] + head + extra + b"\r\n" + body


@dataclass(frozen=True)
class Replies:
    """The refusals, built once per process."""

    headers_too_large: bytes
    header_timeout: bytes
    body_timeout: bytes
    overloaded: bytes
    bad_request: bytes

    @classmethod
    def for_limits(cls, limits: ServerLimits) -> Replies:
        return cls(
            error_reply(431, f"Request line and headers exceed {limits.max_header_bytes} bytes.",
                        "invalid_request_error", "request_header_fields_too_large"),
            error_reply(408, f"Request headers not received within {limits.header_timeout:g} s.",
                        "invalid_request_error", "request_timeout"),
            error_reply(408, f"Request body not received within {limits.body_timeout:g} s.",
                        "invalid_request_error", "request_timeout"),
            error_reply(503, f"The gateway is at its limit of {limits.max_connections} connections; retry shortly.",
                        "server_error", "too_many_connections", b"retry-after: 1\r\n"),
            error_reply(400, "Invalid HTTP request received.", "invalid_request_error", "invalid_http_request"),
        )


class LingeringRefusals:
    """How many refused connections of this process are still draining; past ``MAX_LINGERING`` more are
    dropped at once, so a flood cannot hold file descriptors through lingering either."""

    def __init__(self) -> None:
        self.count = 0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was just refused."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus header size, header/body time and connection count limits."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: ServerLimits, replies: Replies,
                 lingering: LingeringRefusals) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits, self.replies, self.lingering = limits, replies, lingering
        self._phase = _IDLE
        self._header_bytes = 0  # bytes of reads that ended inside the current request's headers
        self._read_size = 0  # size of the read being parsed
        self._deadline: TimerHandle | None = None
        self._refused = False
        self._requests_left = limits.keep_alive_max_requests
        self._max_header_bytes = limits.max_header_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            if self.lingering.count == 0:  # once per flood, not once per connection
                log.warning("connections refused: %d open (--max-connections)", len(self.connections))
            self._refuse(self.replies.overloaded)
            return
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._refused:
            self.lingering.count -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        self._unset_keepalive_if_required()
        # A read that began in a body may end in the next request's headers: those few bytes go uncounted.
        counted = self._phase != _BODY
        self._read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self._refused:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase != _IDLE:
            self._request_incomplete(data, counted)

    def _request_incomplete(self, data: bytes, counted: bool) -> None:
        """The read ended inside a request: bound its headers, and start the clock on the rest."""
        if self._phase == _HEADERS:
            if counted:
                self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:
                self._refuse(self.replies.headers_too_large)
            elif self._deadline is None:
                self._deadline = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def _bad_request(self) -> None:
        self.logger.warning("Invalid HTTP request received.")
        self._refuse(self.replies.bad_request)

    # Parser callbacks: they run on every request, so they stay lean (explicit base calls, no helper calls).
    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._phase = _HEADERS
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        if self._deadline is not None:
            self._cancel_deadline()
        self._phase = _BODY
        # Reads that ended inside the headers were counted; the last one only when it may cross the bound.
        if self._header_bytes + self._read_size > self._max_header_bytes and (
                self._parsed_header_bytes() > self._max_header_bytes):
            self._refuse(self.replies.headers_too_large)
            raise _Refused
        previous = self.cycle
        HttpToolsProtocol.on_headers_complete(self)
        if self.cycle is not previous:  # a request to serve (not an upgrade)
            self._requests_left -= 1
            if self._requests_left == 0:
                self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._cancel_deadline()
        self._phase = _IDLE
        HttpToolsProtocol.on_message_complete(self)

    def _parsed_header_bytes(self) -> int:
        """The request line and header lines as sent, less whitespace the parser dropped."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # Time limits
    def _header_timed_out(self) -> None:
        self._deadline = None
        if self._phase == _HEADERS:
            self._refuse(self.replies.header_timeout)
        elif not self.transport.is_closing():
            self.transport.close()  # nothing sent on this connection yet: nobody to answer

    def _body_timed_out(self) -> None:
        self._deadline = None
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the app answered already; the rest of the body is not worth waiting for
        else:
            self._refuse(self.replies.body_timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, reply: bytes) -> None:
        """Answer ``reply`` (unless a response is already under way), then linger and close."""
        self._refused = True
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        self.lingering.count += 1
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app sees http.disconnect; what it still sends is dropped
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        if self.lingering.count > MAX_LINGERING:
            self.transport.abort()
            return
        self.transport.write(reply)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def protocol_factory(limits: ServerLimits) -> Callable[..., GuardedHttpProtocol]:
    """What uvicorn's ``http=`` takes; picklable, so ``--workers N`` processes each get their own counters."""
    return functools.partial(GuardedHttpProtocol, limits=limits, replies=Replies.for_limits(limits),
                             lingering=LingeringRefusals())


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The options ``bpo serve`` runs uvicorn with (also what the in-process test server uses)."""
    limits = ServerLimits.from_settings(settings)
    return {"http": protocol_factory(limits), "timeout_keep_alive": limits.keep_alive_timeout,
            "server_header": False}


def raise_open_file_limit(max_connections: int) -> None:
    """Lift the soft limit on open files to what ``max_connections`` needs, as far as the hard limit allows."""
    needed = max_connections * FILES_PER_CONNECTION + MAX_LINGERING + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("--max-connections %d needs ~%d open files; the limit is %d", max_connections, needed,
                        target)


def run(app: Any, settings: Settings, *, factory: bool = False) -> None:
    """Serve ``app`` (an ASGI app, or an import string with ``factory``) as ``bpo serve`` does."""
    raise_open_file_limit(settings.max_connections)
    uvicorn.run(app, host=settings.host, port=settings.port, workers=settings.workers, factory=factory,
                log_config=None, access_log=False, timeout_graceful_shutdown=30, **uvicorn_options(settings))
