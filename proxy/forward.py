"""Sending requests upstream: the byte-exact fast path for OpenAI-wire providers, litellm for the rest."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from yarl import URL

from optimizer.urls import without_credentials
from proxy.errors import (
    InvalidRequest,
    NotFound,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_event,
)
from proxy.protocol import dumps_iteratively
from proxy.settings import Settings

log = logging.getLogger("bpo.forward")

# Providers whose API is OpenAI's wire format: their requests take the fast path.
OPENAI_WIRE_PROVIDERS = {"openai", "hosted_vllm", "openai_like", "custom_openai", "vllm", "azure"}
DEFAULT_OPENAI_BASE = "https://api.openai.com/v1"
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
})
USAGE_TAIL_BYTES = 8192
# RFC 3986's path characters: unreserved, sub-delims, ":", "@", "/" and well-formed percent escapes.
_PATH_CHARACTERS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_SEPARATORS = re.compile(r"[/\\]")
# Where an SSE event can end: a line ending (LF, CRLF or CR) followed by an empty line.
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\r\r\n")


@dataclass(frozen=True)
class Target:
    """Where one model's requests go."""

    kind: Literal["openai", "azure", "anthropic", "litellm"]
    model: str
    base_url: str | None = None
    api_key: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Exchange:
    """What one forwarded request observed; filled as the response goes by."""

    status: int = 0
    upstream_seconds: float = 0.0
    usage: dict[str, Any] | None = None
    error: str | None = None


def resolve_target(settings: Settings, model: str) -> Target:
    route = settings.route_for(model)
    if route is None:
        if settings.upstream_base_url:
            return Target("openai", model, settings.upstream_base_url.rstrip("/"), settings.upstream_api_key)
        raise NotFound(f"The model '{model}' does not exist on this gateway.", param="model",
                       code="model_not_found")
    params = dict(route.litellm_params)
    provider, _, provider_model = str(params.pop("model")).partition("/")
    if not provider_model:
        provider, provider_model = "openai", provider
    provider = str(params.pop("custom_llm_provider", provider))
    api_key = params.pop("api_key", None) or settings.upstream_api_key
    if provider == "azure":
        return Target("azure", provider_model, str(params.pop("api_base")).rstrip("/"), api_key, params)
    if provider in OPENAI_WIRE_PROVIDERS:
        base = str(params.pop("api_base", None) or params.pop("base_url", None) or DEFAULT_OPENAI_BASE)
        return Target("openai", provider_model, base.rstrip("/"), api_key, params)
    return Target("litellm", f"{provider}/{provider_model}", None, api_key, route.litellm_params)


def provider_body(body: Mapping[str, Any], target: Target) -> Mapping[str, Any]:
    """The body as the provider takes it: the route's model name (Azure names it in the URL instead)."""
    if target.kind == "azure":
        return {k: v for k, v in body.items() if k != "model"}
    if body.get("model") == target.model:
        return body
    return {**body, "model": target.model}


def encode_body(body: Mapping[str, Any], orjson_safe: bool = False) -> bytes:
    """JSON for the upstream, every value as the client sent it.

    ``orjson_safe``: the body was read by orjson (so it holds no NaN or infinity, which orjson would write as
    null). orjson still refuses integers past 64 bits and lone surrogates; the standard library writes them.
    """
    if orjson_safe:
        try:
            return orjson.dumps(body)
        except TypeError:
            pass
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate escape the client sent: keep it escaped
        return json.dumps(body).encode()
    except RecursionError:  # nested deeper than the stack left allows (orjson reads up to 1024 levels)
        text = dumps_iteratively(body)
        try:
            return text.encode()
        except UnicodeEncodeError:
            return dumps_iteratively(body, ensure_ascii=True).encode()


def chat_url(target: Target) -> tuple[str, dict[str, str] | None]:
    """The chat completions URL of an OpenAI-wire target, and its query parameters."""
    if target.kind == "azure":
        version = str(target.params.get("api_version", "2024-10-21"))
        return (f"{target.base_url}/openai/deployments/{target.model}/chat/completions",
                {"api-version": version})
    return f"{target.base_url}/chat/completions", None


def passthrough_url(base_url: str, raw_path: str, query: str) -> URL:
    """``base_url`` followed by what comes after ``/v1`` in the client's raw path, and its query.

    The path goes on as the client encoded it (``%2F`` inside a segment stays ``%2F``), so it can only ever
    name a path on the configured scheme, host and port. What could still climb out of the base path is
    refused, not normalised: a path not under ``/v1/`` as sent (``/v1%2F@host``), characters outside RFC
    3986's path set, and dot segments in any spelling (``..``, ``%2e%2e``, ``..%2F`` or ``..%5C`` in a
    segment), because the provider may decode once more than we do.
    """
    if not raw_path.startswith("/v1/") or not _PATH_CHARACTERS.fullmatch(raw_path):
        raise InvalidRequest("The path must be /v1/ followed by a percent-encoded path.", code="invalid_path")
    tail = raw_path.removeprefix("/v1")
    for segment in tail.split("/"):
        if any(part in (".", "..") for part in _SEPARATORS.split(unquote(segment))):
            raise InvalidRequest("Dot segments (. and .., encoded or not) are not allowed in the path.",
                                 code="invalid_path")
    base = URL(base_url)
    url = URL.build(scheme=base.scheme, authority=base.raw_authority, path=base.raw_path.rstrip("/") + tail,
                    query_string=query, encoded=True)
    if (url.scheme, url.raw_host, url.port) != (base.scheme, base.raw_host, base.port):
        raise InvalidRequest("The path must not name another host.", code="invalid_path")
    return url


def upstream_headers(headers: Mapping[str, str], api_key: str | None, azure: bool = False) -> dict[str, str]:
    """The client's headers minus hop-by-hop and the gateway's own X-BPO*; the key replaced if configured.

    ``headers`` have lower-case names, as ASGI (and so Starlette) gives them.
    """
    out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and not k.startswith("x-bpo")}
    out["accept-encoding"] = "identity"  # bytes pass through as sent; no re-compression on our side
    if api_key:
        out.pop("authorization", None)
        out.pop("api-key", None)
        out["api-key" if azure else "authorization"] = api_key if azure else f"Bearer {api_key}"
    return out


# The gateway's server sets its own Date; the provider's Server says nothing about this hop.
_NOT_RELAYED = frozenset(name.encode() for name in HOP_BY_HOP | {"date", "server"})


def downstream_headers(upstream: Iterable[tuple[bytes, bytes]], extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """The upstream's header lines for the client, then the gateway's ``extra``, as ASGI header pairs.

    Repeated headers (Set-Cookie) stay repeated. The upstream's X-Request-Id becomes X-Upstream-Request-Id
    (ours wins; the provider's is kept for support tickets); its X-BPO* headers are dropped: those on this
    response describe this gateway's handling.
    """
    out = []
    for name, value in upstream:
        name = name.lower()
        if name in _NOT_RELAYED or name.startswith(b"x-bpo"):
            continue
        out.append((b"x-upstream-request-id" if name == b"x-request-id" else name, value))
    out.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in extra.items())
    return out


class RelayedResponse(Response):
    """An upstream answer as it came: its bytes, status and header lines (``downstream_headers``).

    Starlette's Response would decode, re-encode and rescan every header; these already are wire headers.
    """

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        if status_code >= 200 and status_code not in (204, 304):
            raw_headers.append((b"content-length", str(len(body)).encode()))
        self.raw_headers = raw_headers


def extract_usage(payload: bytes) -> dict[str, Any] | None:
    """``usage`` of a JSON body, or of the last SSE event that carries one (streams with include_usage)."""
    if payload.lstrip().startswith(b"{"):
        return _usage_of(payload)
    with_usage = [data for data in sse_data(payload) if b'"usage"' in data]
    return _usage_of(with_usage[-1]) if with_usage else None


def sse_data(payload: bytes) -> Iterator[bytes]:
    """The payload of each ``data:`` line of SSE bytes, in order, without the ``[DONE]`` sentinel."""
    for line in payload.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            yield line[5:]


def split_at_event_end(data: bytes) -> tuple[bytes, bytes]:
    """``data`` up to the end of its last whole SSE event, and what follows it (an event still arriving)."""
    end = max((data.rfind(mark) + len(mark) for mark in _EVENT_ENDS if mark in data), default=0)
    return data[:end], data[end:]


def _usage_of(data: bytes) -> dict[str, Any] | None:
    """``usage`` at the top (chat, Messages) or in ``response`` (the Responses API's events)."""
    try:
        body = orjson.loads(data)
        usage = body.get("usage") or (body.get("response") or {}).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


class HttpForwarder:
    """One pooled aiohttp session; responses and SSE streams go back byte for byte.

    ``on_broken_stream(reason)`` hears of every stream the upstream broke off after it began: ``cut`` (the
    connection broke) or ``idle`` (silent past the timeout). The client gets an SSE error event instead of
    a clean end that would pass truncated text off as the whole answer.
    """

    def __init__(self, timeout: float, on_broken_stream: Callable[[str], None] | None = None) -> None:
        # A whole-request deadline for plain answers (one timer per request); for streams an idle deadline
        # between chunks instead, so a long generation may run as long as tokens keep coming.
        self.timeout = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)
        self._on_broken_stream = on_broken_stream
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, method: str, url: str | URL, headers: Mapping[str, str], body: bytes,
                      exchange: Exchange, extra_headers: Mapping[str, str],
                      on_done: Callable[[Exchange], None] | None = None,
                      params: Mapping[str, str] | None = None, stream: bool = False) -> Response:
        """Send, then relay: a full body, or an SSE stream chunk by chunk, cut only where events end.

        ``stream``: the answer may be a stream. Then the timeout bounds each silence while it streams (a long
        generation runs as long as tokens come); a plain answer is still bounded as a whole.
        """
        assert self._session is not None, "HttpForwarder.start() was not awaited"
        if isinstance(url, str) and "@" in url:  # parsed here only when it may hold credentials (hot path)
            url = URL(url)
        if isinstance(url, URL) and (url.raw_user is not None or url.raw_password is not None):
            # Configured credentials, in place of the client's Authorization: aiohttp refuses a URL with
            # credentials next to an Authorization header, and every SDK sends one.
            url, basic_auth = without_credentials(url)
            headers = {**headers, "authorization": basic_auth or ""}
        started = time.perf_counter()
        try:
            upstream = await self._session.request(method, url, headers=headers, data=body, params=params,
                                                   timeout=self._stream_timeout if stream else self._timeout)
        except TimeoutError as exc:
            raise self._timed_out() from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream unreachable: %s", exc)
            raise UpstreamUnreachable("The upstream could not be reached.") from exc
        exchange.status = upstream.status
        response_headers = downstream_headers(upstream.raw_headers, extra_headers)
        if upstream.content_type == "text/event-stream":
            exchange.upstream_seconds = time.perf_counter() - started
            relay = StreamingResponse(self._relay(upstream, exchange, on_done), status_code=upstream.status)
            relay.raw_headers = response_headers
            return relay
        payload = await self._read(upstream, started if stream else None)
        exchange.upstream_seconds = time.perf_counter() - started
        exchange.usage = extract_usage(payload) if upstream.status < 400 else None
        if on_done is not None:
            on_done(exchange)
        return RelayedResponse(payload, upstream.status, response_headers)

    async def _read(self, upstream: aiohttp.ClientResponse, stream_started: float | None) -> bytes:
        """A plain answer's body, within the whole-request deadline.

        A streaming request that got a plain answer was sent with the idle deadline only: its deadline is
        kept here, so a body trickled in byte by byte cannot outlast it.
        """
        try:
            if stream_started is None:
                return await upstream.read()
            async with asyncio.timeout(max(0.0, stream_started + self.timeout - time.perf_counter())):
                return await upstream.read()
        except TimeoutError as exc:
            raise self._timed_out() from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream broke off its answer: %s", exc)
            raise UpstreamUnreachable("The upstream broke off its answer.") from exc
        finally:
            upstream.release()

    def _timed_out(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"The upstream did not answer within {self.timeout:g} s (--upstream-timeout).")

    async def _relay(self, upstream: aiohttp.ClientResponse, exchange: Exchange,
                     on_done: Callable[[Exchange], None] | None) -> AsyncIterator[bytes]:
        """The stream's chunks as they come, each cut only where an SSE event ends.

        A chunk that ends inside an event (rare: the provider writes whole events) waits for the event's
        end, so that when the stream breaks the client gets whole events and then the error event, never
        half an event glued to it.
        """
        tail = held = b""
        finished = False
        try:
            async for chunk in upstream.content.iter_any():
                tail = (tail + chunk)[-USAGE_TAIL_BYTES:]
                if held or not chunk.endswith(_EVENT_ENDS):
                    chunk, held = split_at_event_end(held + chunk)
                if chunk:
                    yield chunk
            finished = True
            if held:  # the provider's last bytes, as they came: its stream ended on its own terms
                yield held
        except (aiohttp.ClientError, TimeoutError) as exc:
            yield self._broken(exc, exchange)
        finally:
            # A client that went away must cancel the upstream generation: close the connection.
            upstream.release() if finished else upstream.close()
            exchange.usage = extract_usage(tail)
            if on_done is not None:
                on_done(exchange)

    def _broken(self, exc: Exception, exchange: Exchange) -> bytes:
        idle = isinstance(exc, TimeoutError)
        reason = "idle" if idle else "cut"
        error = UpstreamStreamBroken(
            f"The upstream sent nothing for {self.timeout:g} s (--upstream-timeout); the answer is incomplete."
            if idle else "The upstream broke off the stream; the answer is incomplete.")
        exchange.error = error.message
        log.warning("upstream stream broken (%s): %s", reason, exc)
        if self._on_broken_stream is not None:
            self._on_broken_stream(reason)
        return error_event(error)
