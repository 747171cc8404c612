"""Event sinks: buffered JSONL and Redis stream writers that never block or fail a request."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.events import JsonlSink, NullSink, RedisStreamSink, SinkError, build_sink, parse_redis_spec
from proxy.metrics import Metrics
from proxy.report import load_events
from tests.fakes.proxy_server import make_settings
from tests.fakes.upstream import free_port
from tests.optimizer.cache_helpers import RedisServer, until

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def fail_open(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("bpo_fail_open_total", {"component": "events"}) or 0.0


def request_event(i: int) -> dict[str, Any]:
    return {"type": "request", "request_id": f"req_{i}", "time": 1.0 + i, "arm": "treatment", "applied": True}


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"bpo-test-events-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(SHARED_REDIS)
    client.delete(name)
    client.close()


async def test_jsonl_sink_writes_every_event_in_order_and_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(str(path), Metrics(), flush_interval=60.0)  # only close() can have flushed
    await sink.start()
    for i in range(250):
        sink.emit(request_event(i))
    await sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [request_event(i) for i in range(250)]
    assert sink.written == 250 and sink.dropped == 0


async def test_jsonl_sink_appends_to_an_existing_file_shared_by_two_writers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(request_event(-1)) + "\n")
    first, second = JsonlSink(str(path), Metrics()), JsonlSink(str(path), Metrics())
    await first.start()
    await second.start()
    for i in range(100):
        (first if i % 2 else second).emit(request_event(i) | {"pad": "x" * 2000})
    await first.close()
    await second.close()
    ids = sorted(json.loads(line)["request_id"] for line in path.read_text().splitlines())
    assert ids == sorted(["req_-1", *(f"req_{i}" for i in range(100))])


async def test_an_unwritable_path_fails_at_start_with_a_clear_message(tmp_path: Path) -> None:
    sink = JsonlSink(str(tmp_path / "missing-dir" / "events.jsonl"), Metrics())
    with pytest.raises(SinkError, match="cannot open"):
        await sink.start()


async def test_emit_never_raises_and_keeps_odd_values(tmp_path: Path) -> None:
    metrics = Metrics()
    sink = JsonlSink(str(tmp_path / "e.jsonl"), metrics)
    await sink.start()
    circular: dict[str, Any] = {"type": "request"}
    circular["self"] = circular
    sink.emit(circular)  # cannot be encoded: dropped and counted, not raised
    sink.emit({"type": "request", "request_id": "r", "tags": frozenset({"a"}), "path": tmp_path})
    await sink.close()
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) | {"tags": None} == {"type": "request", "request_id": "r", "tags": None,
                                                     "path": str(tmp_path)}
    assert sink.dropped == 1 and fail_open(metrics) == 1


def test_the_buffer_is_bounded_and_overflow_is_counted() -> None:
    metrics = Metrics()
    sink = JsonlSink("/unused", metrics, max_buffer=5)  # never started: nothing drains the buffer
    for i in range(8):
        sink.emit(request_event(i))
    assert sink.dropped == 3 and fail_open(metrics) == 3


async def test_redis_sink_writes_a_stream_the_report_reads_back(stream: str) -> None:
    sink = RedisStreamSink(f"{SHARED_REDIS}?stream={stream}", Metrics())
    await sink.start()
    for i in range(1500):  # more than one XRANGE page in the reader
        sink.emit(request_event(i))
    await sink.close()
    loaded = load_events(f"{SHARED_REDIS}?stream={stream}")
    assert loaded.malformed == 0
    assert loaded.events == [request_event(i) for i in range(1500)]


async def test_a_dead_redis_costs_counted_retries_and_the_events_arrive_once_it_is_back() -> None:
    port = free_port()
    metrics = Metrics()
    sink = RedisStreamSink(f"redis://127.0.0.1:{port}/0?stream=ev", metrics, retry_delay=0.05)
    await sink.start()
    for i in range(3):
        sink.emit(request_event(i))  # nothing listens on the port: must not raise
    await until(lambda: fail_open(metrics) >= 1)
    server = RedisServer(port).start()
    try:
        await until(lambda: sink.written == 3)
        sink.emit(request_event(3))
        await sink.close()
        entries = server.client().xrange("ev")
        assert [json.loads(fields[b"event"])["request_id"] for _, fields in entries] == [
            "req_0", "req_1", "req_2", "req_3"]
    finally:
        server.kill()


def test_build_sink_follows_the_events_setting(tmp_path: Path) -> None:
    metrics = Metrics()
    assert isinstance(build_sink(make_settings(), metrics), NullSink)
    jsonl = build_sink(make_settings(events=f"jsonl:{tmp_path}/e.jsonl"), metrics)
    assert isinstance(jsonl, JsonlSink) and jsonl.path == f"{tmp_path}/e.jsonl"
    stream_sink = build_sink(make_settings(events="redis://localhost:6380/2?stream=ab&maxlen=500"), metrics)
    assert isinstance(stream_sink, RedisStreamSink)
    assert (stream_sink.url, stream_sink.stream, stream_sink.maxlen) == ("redis://localhost:6380/2", "ab", 500)


def test_redis_spec_defaults_and_errors() -> None:
    assert parse_redis_spec("redis://h:1/0") == ("redis://h:1/0", "bpo:events", 1_000_000)
    assert parse_redis_spec("rediss://h:1/0?ssl_cert_reqs=none&stream=s")[:2] == (
        "rediss://h:1/0?ssl_cert_reqs=none", "s")
    with pytest.raises(SinkError, match="maxlen"):
        parse_redis_spec("redis://h:1/0?maxlen=lots")
