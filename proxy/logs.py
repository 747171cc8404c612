"""Structured JSON logs: one object per line, request id included, never prompt text or keys at INFO."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import IO, Any

import orjson


def encode_record(value: Any, option: int = 0) -> bytes:
    """JSON for a log line or an event: orjson, and the standard library for what orjson refuses.

    Records carry client input (a model name, a feedback comment); a lone surrogate escape in it (valid JSON,
    no UTF-8) or an integer past 64 bits is written escaped rather than losing the record or the request.
    """
    try:
        return orjson.dumps(value, default=str, option=option)
    except TypeError:
        line = json.dumps(value, default=str, separators=(",", ":")).encode()
        return line + b"\n" if option & orjson.OPT_APPEND_NEWLINE else line


# Record attributes that are not fields of a line: the LogRecord's own, and markers other libraries' filters
# set (uvicorn's color_message, litellm's litellm_redacted sentinel object).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message", "litellm_redacted"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return encode_record(entry).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "LiteLLM", "httpx"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


_last_second: tuple[int, str] = (-1, "")  # a second and its formatted prefix: strftime once a second, not per line


def utc_timestamp(seconds: float) -> str:
    global _last_second
    whole = int(seconds)
    second, prefix = _last_second  # one read: threads that log see a consistent pair
    if whole != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second = (whole, prefix)
    return f"{prefix}.{int((seconds - whole) * 1000):03d}Z"


_ACCESS_HEAD = b'","level":"info","logger":"bpo.access","message":"chat completion"'


class AccessLog:
    """One JSON line per request, written off the request path.

    The logging module costs ~45 us a record (LogRecord, formatter, a locked write and flush per line): more
    than the rest of a cache-hit request. Lines are encoded on the spot and written in batches by one task.
    """

    def __init__(self, stream: IO[bytes] | None = None, flush_interval: float = 0.1, max_buffer: int = 1 << 16):
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._interval = flush_interval
        self._max_buffer = max_buffer
        self._lines: list[bytes] = []
        self._size = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, fields: dict[str, Any]) -> None:
        """One line: the fixed head (time, level, logger, message), then ``fields``; one encode, no merge."""
        tail = encode_record(fields, orjson.OPT_APPEND_NEWLINE)
        line = b"".join((b'{"time":"', utc_timestamp(time.time()).encode(), _ACCESS_HEAD,
                         b"," + tail[1:] if fields else b"}\n"))
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_buffer:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data, self._lines, self._size = b"".join(self._lines), [], 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a closed or full stderr must not fail requests
            logging.getLogger("bpo.access").warning("access log write failed: %s", exc)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()
