"""Reading events back from a sink (a JSONL file or a Redis stream) for ``bpo ab report``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

EVENT_TYPES = ("request", "feedback", "shadow")
REDIS_PAGE = 1000


class ReportError(Exception):
    """The events cannot be read (missing file, unreachable Redis, bad spec)."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Events(Protocol):
    """What the report reads: events to iterate once, and how many records were skipped as malformed."""

    @property
    def malformed(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class EventStream:
    """The valid events of a sink, read lazily; ``malformed`` counts the records skipped so far."""

    def __init__(self, records: Iterable[bytes]) -> None:
        self._records = records
        self.malformed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self._records:
            if not record.strip():
                continue
            event = valid_event(record)
            if event is None:
                self.malformed += 1
            else:
                yield event


@dataclass
class Loaded:
    """A whole sink in memory (tests and small files); iterates like an ``EventStream``."""

    events: list[dict[str, Any]]
    malformed: int = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)


def valid_event(record: bytes) -> dict[str, Any] | None:
    """The event, or None for a record the report cannot use (bad JSON, a cut-off line, unknown type)."""
    try:
        event = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        return None
    if not isinstance(event.get("request_id"), str):
        return None
    if event["type"] == "feedback" and not is_number(event.get("score")):
        return None
    return event


def open_events(spec: str) -> EventStream:
    """``jsonl:PATH`` (or a bare path) or ``redis://HOST:PORT/DB[?stream=NAME]``."""
    if spec.startswith(("redis://", "rediss://")):
        return EventStream(_redis_records(spec))
    path = Path(spec.removeprefix("jsonl:"))
    try:
        lines = path.open("rb")  # opened now, so a missing file fails before any output
    except OSError as exc:
        raise ReportError(f"--events {spec}: cannot read {path}: {exc.strerror}") from exc
    return EventStream(_file_records(lines))


def load_events(spec: str) -> Loaded:
    stream = open_events(spec)
    events = list(stream)
    return Loaded(events, stream.malformed)


def _file_records(lines: IO[bytes]) -> Iterator[bytes]:
    with lines:
        yield from lines


def _redis_records(spec: str) -> Iterator[bytes]:
    import redis

    from proxy.events import STREAM_FIELD, parse_redis_spec  # the writer's format; imported on use

    url, stream, _ = parse_redis_spec(spec)
    client: Any = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
    start = "-"
    try:
        while True:
            page: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream, min=start, max="+",
                                                                         count=REDIS_PAGE)
            for _entry_id, fields in page:
                yield fields.get(STREAM_FIELD, b"")
            if len(page) < REDIS_PAGE:
                return
            start = "(" + page[-1][0].decode()
    except redis.RedisError as exc:
        raise ReportError(f"--events {spec}: cannot read the stream {stream!r}: {exc}") from exc
    finally:
        client.close()
