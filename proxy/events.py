"""Event sinks: one JSON record per request, feedback or shadow verdict, written off the request path."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from proxy.logs import encode_record
from proxy.metrics import Metrics
from proxy.settings import Settings

log = logging.getLogger("bpo.events")

DEFAULT_STREAM = "bpo:events"
DEFAULT_STREAM_MAXLEN = 1_000_000
STREAM_FIELD = b"event"


class SinkError(Exception):
    """The sink cannot be used as configured (raised at start-up, never from ``emit``)."""


class EventSink(Protocol):
    """Where events go. ``emit`` never blocks and never raises; writes happen in the background."""

    enabled: bool  # False when events are dropped anyway: callers skip building them

    def emit(self, event: dict[str, Any]) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Flush what is buffered, then release the file or connection."""
        ...


class NullSink:
    """``--events none``: events are dropped."""

    enabled = False

    def emit(self, event: dict[str, Any]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def encode_event(event: dict[str, Any]) -> bytes:
    # default=str: a stray datetime or Decimal in an event must not lose the whole record.
    return encode_record(event, orjson.OPT_NON_STR_KEYS)


class BufferedSink(abc.ABC):
    """Encodes on ``emit`` and hands batches to ``write_batch`` from one background task.

    The buffer is bounded: when the destination stalls, newer events are dropped and counted
    (``bpo_fail_open_total{component="events"}``) rather than growing memory without limit.
    ``emit`` must be called from the event loop thread that ran ``start``.
    """

    enabled = True

    component = "events"

    def __init__(self, metrics: Metrics, *, max_buffer: int = 10_000, flush_interval: float = 0.25,
                 retry_delay: float = 1.0) -> None:
        self.metrics = metrics
        self.max_buffer = max_buffer
        self.flush_interval = flush_interval
        self.retry_delay = retry_delay
        self.dropped = 0
        self.written = 0
        self._buffer: list[bytes] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def emit(self, event: dict[str, Any]) -> None:
        try:
            if len(self._buffer) >= self.max_buffer:
                self._drop(1, "buffer full")
                return
            self._buffer.append(encode_event(event))
            if self._wakeup is not None:
                self._wakeup.set()
        except Exception:  # the documented fail-open: an event never fails its request
            log.exception("event dropped: could not encode")
            self._drop(1, "encode error")

    async def start(self) -> None:
        await self.open()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"{type(self).__name__}-writer")

    async def close(self) -> None:
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush_once()
        await self.release()

    async def open(self) -> None:
        """Acquire the destination; raise ``SinkError`` when the configuration cannot work."""
        return None

    async def release(self) -> None:
        """Release the destination after the last flush."""
        return None

    @abc.abstractmethod
    async def write_batch(self, lines: Sequence[bytes]) -> None:
        """Write one batch of encoded lines; raise to have it kept and retried."""

    async def _run(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.flush_interval)
            self._wakeup.clear()
            if not await self._flush_once() and not self._closing:
                await asyncio.sleep(self.retry_delay)

    async def _flush_once(self) -> bool:
        """Write everything buffered; on failure keep the batch for the next try. True when it worked."""
        if not self._buffer:
            return True
        batch, self._buffer = self._buffer, []
        try:
            await self.write_batch(batch)
        except Exception as exc:  # the documented fail-open: a broken sink is logged, counted, retried
            log.warning("events sink %s failed: %s", type(self).__name__, exc)
            self.metrics.fail_open.labels(component=self.component).inc()
            room = self.max_buffer - len(self._buffer)
            kept = batch[-room:] if room > 0 else []
            self._drop(len(batch) - len(kept), "buffer full after a failed write")
            self._buffer = kept + self._buffer
            return False
        self.written += len(batch)
        return True

    def _drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        self.dropped += count
        self.metrics.fail_open.labels(component=self.component).inc(count)
        log.debug("dropped %d event(s): %s", count, why)


class JsonlSink(BufferedSink):
    """``jsonl:PATH``: one JSON object per line, appended (O_APPEND, so several workers can share a file)."""

    def __init__(self, path: str, metrics: Metrics, **options: Any) -> None:
        super().__init__(metrics, **options)
        self.path = path
        self._fd: int | None = None

    async def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SinkError(f"--events jsonl:{self.path}: cannot open for appending: {exc.strerror}") from exc

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def write_batch(self, lines: Sequence[bytes]) -> None:
        if self._fd is None:
            raise SinkError("jsonl sink is closed")
        # One write per batch: appends of whole lines never interleave with another worker's.
        await asyncio.to_thread(_write_all, self._fd, b"".join(line + b"\n" for line in lines))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RedisStreamSink(BufferedSink):
    """``redis://HOST:PORT/DB[?stream=NAME&maxlen=N]``: XADD each event (field ``event``) to a stream."""

    def __init__(self, url: str, metrics: Metrics, **options: Any) -> None:
        super().__init__(metrics, **options)
        self.url, self.stream, self.maxlen = parse_redis_spec(url)
        self._client: Any = None

    async def open(self) -> None:
        import redis.asyncio as redis

        # Short timeouts: a stalled Redis costs the writer task a retry, never a request.
        self._client = redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def release(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def write_batch(self, lines: Sequence[bytes]) -> None:
        if self._client is None:
            raise SinkError("redis sink is closed")
        async with self._client.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.xadd(self.stream, {STREAM_FIELD: line}, maxlen=self.maxlen, approximate=True)
            await pipe.execute()


def parse_redis_spec(spec: str) -> tuple[str, str, int]:
    """Split our ``stream`` and ``maxlen`` query parameters off a Redis URL."""
    parts = urlsplit(spec)
    query = dict(parse_qsl(parts.query))
    stream = query.pop("stream", DEFAULT_STREAM)
    try:
        maxlen = int(query.pop("maxlen", DEFAULT_STREAM_MAXLEN))
    except ValueError as exc:
        raise SinkError(f"--events {spec}: maxlen must be an integer") from exc
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return url, stream, maxlen


def build_sink(settings: Settings, metrics: Metrics) -> EventSink:
    """The sink named by ``--events``: none | jsonl:PATH | redis://HOST:PORT/DB."""
    spec = settings.events
    if spec == "none":
        return NullSink()
    if spec.startswith("jsonl:"):
        return JsonlSink(spec.removeprefix("jsonl:"), metrics)
    if spec.startswith(("redis://", "rediss://")):
        return RedisStreamSink(spec, metrics)
    raise SinkError(f"--events {spec!r}: must be none, jsonl:PATH or redis://HOST:PORT/DB")
