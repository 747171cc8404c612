"""The two-tier Redis cache against real Redis: sharing, TTL, namespaces, corruption, single-flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis

from optimizer.base import OptimizerError
from optimizer.breaker import CircuitBreaker
from optimizer.cache import CacheOptions, LocalTier, build_cache, cache_key, tenant_of
from optimizer.redis_cache import RedisCache, decode_value, encode_value
from optimizer.urls import redact_url
from tests.fakes.fixtures import SHARED_REDIS_URL
from tests.optimizer.cache_helpers import CountingCompute, Events, rewrite, until

PROMPT = "Write a haiku about the sea"


def make_cache(namespace: str, url: str = SHARED_REDIS_URL, events: Events | None = None,
               ttl: float = 3600.0, **options: Any) -> RedisCache:
    # A generous per-operation timeout: a busy CI machine must not turn a slow Redis reply into an error
    # event. The test of timeouts themselves sets its own.
    options.setdefault("op_timeout", 2.0)
    return RedisCache(url, LocalTier(1000, 1 << 22, ttl), namespace=namespace, ttl_seconds=ttl,
                      on_event=events, **options)


@asynccontextmanager
async def started(*caches: RedisCache) -> AsyncIterator[None]:
    for cache in caches:
        await cache.start()
    try:
        yield
    finally:
        for cache in caches:
            await cache.close()


def key_for(text: str = PROMPT, optimizer: str = "fake@1", tenant: str = "") -> str:
    return cache_key(optimizer, "stable", text, tenant)


async def test_hit_after_miss_locally_and_from_redis_in_a_second_replica(namespace: str,
                                                                          shared_redis: redis.Redis) -> None:
    events_a, events_b = Events(), Events()
    a, b = make_cache(namespace, events=events_a), make_cache(namespace, events=events_b)
    compute = CountingCompute()
    async with started(a, b):
        assert await a.get_or_compute(key_for(), compute) == (compute.values[0], False)
        assert await a.get_or_compute(key_for(), compute) == (compute.values[0], True)
        assert await b.get_or_compute(key_for(), compute) == (compute.values[0], True)
        assert await b.get_or_compute(key_for(), compute) == (compute.values[0], True)  # now b's local tier
    assert compute.calls == 1
    assert events_a == {"miss": 1, "hit": 1} and events_b == {"hit": 2}
    assert decode_value(shared_redis.get(a.value_key(key_for()))) == compute.values[0]


async def test_redis_holds_the_hash_and_the_rewrite_never_the_prompt(namespace: str,
                                                                      shared_redis: redis.Redis) -> None:
    cache = make_cache(namespace)
    async with started(cache):
        await cache.get_or_compute(key_for(), CountingCompute(lambda n: rewrite("An improved prompt")))
    stored = {key: shared_redis.get(key) for key in shared_redis.scan_iter(match=f"{namespace}:*")}
    assert list(stored) == [f"{namespace}:rewrite:{key_for()}".encode()]
    value = orjson.loads(next(iter(stored.values())))
    assert value["text"] == "An improved prompt" and value["optimizer"] == "fake@1"
    assert set(value) == {"v", "text", "verdict", "optimizer", "created", "guard_rule"}
    assert not any(b"haiku" in key or b"haiku" in raw for key, raw in stored.items())


async def test_negative_results_are_shared_too(namespace: str) -> None:
    a, b = make_cache(namespace), make_cache(namespace)
    rejected = CountingCompute(lambda n: rewrite("", "guard-rejected", guard_rule="dropped-content"))
    async with started(a, b):
        await a.get_or_compute(key_for(), rejected)
        value, hit = await b.get_or_compute(key_for(), rejected)
    assert hit and rejected.calls == 1
    assert (value.verdict, value.guard_rule, value.text) == ("guard-rejected", "dropped-content", "")


async def test_ttl_is_set_in_redis_and_entries_expire(namespace: str, shared_redis: redis.Redis) -> None:
    default = build_cache(CacheOptions(SHARED_REDIS_URL, namespace=namespace), Events())
    assert isinstance(default, RedisCache)
    async with started(default):
        await default.get_or_compute("k-default", CountingCompute())
    assert 7 * 86400 * 1000 - 60_000 < shared_redis.pttl(f"{namespace}:rewrite:k-default") <= 7 * 86400 * 1000

    short = make_cache(namespace, ttl=2.0)  # long enough to read it back on a busy machine
    compute = CountingCompute()
    async with started(short):
        await short.get_or_compute("k-short", compute)
        assert 0 < shared_redis.pttl(f"{namespace}:rewrite:k-short") <= 2000
        await until(lambda: shared_redis.exists(f"{namespace}:rewrite:k-short") == 0, timeout=60)
        value, hit = await short.get_or_compute("k-short", compute)  # expired in both tiers
    assert not hit and compute.calls == 2 and value == compute.values[1]


async def test_namespaces_do_not_share(namespace: str, shared_redis: redis.Redis) -> None:
    other = f"{namespace}-other"
    a, b = make_cache(namespace), make_cache(other)
    compute = CountingCompute()
    try:
        async with started(a, b):
            await a.get_or_compute(key_for(), compute)
            assert (await b.get_or_compute(key_for(), compute))[1] is False
        assert compute.calls == 2
        assert shared_redis.exists(f"{namespace}:rewrite:{key_for()}", f"{other}:rewrite:{key_for()}") == 2
    finally:
        shared_redis.delete(*shared_redis.keys(f"{other}:*"))


async def test_version_change_and_tenant_scope_are_misses(namespace: str) -> None:
    a, b = make_cache(namespace), make_cache(namespace)
    compute = CountingCompute()
    async with started(a, b):
        await a.get_or_compute(key_for(optimizer="fake@1"), compute)
        assert (await b.get_or_compute(key_for(optimizer="fake@2"), compute))[1] is False
        await a.get_or_compute(key_for(tenant=tenant_of("sk-alice")), compute)
        assert (await b.get_or_compute(key_for(tenant=tenant_of("sk-bob")), compute))[1] is False
        assert (await b.get_or_compute(key_for(tenant=tenant_of("sk-alice")), compute))[1] is True
    assert compute.calls == 4


@pytest.mark.parametrize("garbage", [
    b"\x00\xffnot json", b"[1, 2, 3]", b'{"v": 1}', b'{"v": 99, "text": "t", "verdict": "applied"}',
    orjson.dumps({"v": 1, "text": "t", "verdict": "bogus", "optimizer": "o", "created": 1.0, "guard_rule": None}),
    orjson.dumps({"v": 1, "text": 5, "verdict": "applied", "optimizer": "o", "created": 1.0, "guard_rule": None}),
])
async def test_a_corrupted_value_is_a_miss_not_an_error(namespace: str, shared_redis: redis.Redis,
                                                         garbage: bytes) -> None:
    events = Events()
    cache = make_cache(namespace, events=events)
    shared_redis.set(cache.value_key(key_for()), garbage)
    compute = CountingCompute()
    async with started(cache):
        value, hit = await cache.get_or_compute(key_for(), compute)
        assert cache.status()["corrupt_values"] == 1 and cache.status()["state"] == "ok"
    assert not hit and compute.calls == 1 and value == compute.values[0]
    assert events == {"miss": 1}
    assert decode_value(shared_redis.get(cache.value_key(key_for()))) == value  # repaired


def test_value_round_trip() -> None:
    value = rewrite("é ✓ text", "guard-rejected", guard_rule="rule-x")
    assert decode_value(encode_value(value)) == value


async def test_forty_concurrent_identical_keys_in_one_process_cost_one_compute(namespace: str) -> None:
    events = Events()
    cache = make_cache(namespace, events=events)
    compute = CountingCompute(gate=asyncio.Event())
    async with started(cache):
        callers = [asyncio.ensure_future(cache.get_or_compute(key_for(), compute)) for _ in range(40)]
        await until(lambda: compute.calls == 1)
        compute.gate.set()  # type: ignore[union-attr]
        results = await asyncio.gather(*callers)
    assert compute.calls == 1 and {value for value, _ in results} == {compute.values[0]}
    assert events == {"miss": 1, "hit": 39}


async def test_two_replicas_share_one_compute(namespace: str) -> None:
    events_a, events_b = Events(), Events()
    # b polls only every 10 s: finishing within the 5 s below proves the pub/sub message woke it.
    a = make_cache(namespace, events=events_a)
    b = make_cache(namespace, events=events_b, poll_min=10.0, poll_max=10.0)
    compute_a, compute_b = CountingCompute(gate=asyncio.Event()), CountingCompute(gate=asyncio.Event())
    async with started(a, b):
        await until(lambda: a.subscribed and b.subscribed)
        on_a = [asyncio.ensure_future(a.get_or_compute(key_for(), compute_a)) for _ in range(20)]
        await until(lambda: compute_a.calls == 1)  # a holds the lock
        on_b = [asyncio.ensure_future(b.get_or_compute(key_for(), compute_b)) for _ in range(20)]
        await until(lambda: key_for() in b._waiters)  # b is waiting on a's result
        compute_a.gate.set()  # type: ignore[union-attr]
        results = await asyncio.wait_for(asyncio.gather(*on_a, *on_b), 5.0)
    assert (compute_a.calls, compute_b.calls) == (1, 0)
    assert {value for value, _ in results} == {compute_a.values[0]}
    assert events_a == {"miss": 1, "hit": 19} and events_b == {"hit": 20}


async def test_a_waiter_finds_the_result_by_polling_when_no_message_comes(namespace: str,
                                                                           shared_redis: redis.Redis) -> None:
    cache = make_cache(namespace, poll_max=0.05)
    lock = cache.lock_key(key_for())
    shared_redis.set(lock, "another-replica", px=10_000)
    compute = CountingCompute()
    async with started(cache):
        waiting = asyncio.ensure_future(cache.get_or_compute(key_for(), compute))
        await until(lambda: key_for() in cache._waiters)
        published = rewrite("written by a replica whose message was lost")
        shared_redis.set(cache.value_key(key_for()), encode_value(published))  # no PUBLISH
        assert await waiting == (published, True)
    assert compute.calls == 0


async def test_a_caller_past_its_deadline_leaves_the_cross_replica_wait_running(
        namespace: str, shared_redis: redis.Redis) -> None:
    cache = make_cache(namespace, poll_min=10.0, poll_max=10.0)
    shared_redis.set(cache.lock_key(key_for()), "another-replica", px=10_000)
    compute = CountingCompute()
    async with started(cache):
        await until(lambda: cache.subscribed)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.get_or_compute(key_for(), compute), 0.05)
        assert key_for() in cache._waiters  # the shared wait goes on without its caller
        published = rewrite("finished by the other replica")
        shared_redis.set(cache.value_key(key_for()), encode_value(published))
        shared_redis.publish(f"{namespace}:rewrite-done", key_for().encode() + b"\n" + encode_value(published))
        await until(lambda: cache.local.get(key_for()) is not None)
        assert await cache.get_or_compute(key_for(), compute) == (published, True)
    assert compute.calls == 0


async def test_holder_dies_and_a_waiter_takes_over(namespace: str, own_redis: Any) -> None:
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-m", "tests.optimizer.cache_helpers", own_redis.url, namespace,
                               key_for(), "1.0"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"computing\n"
        cache = make_cache(namespace, url=own_redis.url, poll_max=0.1)
        compute = CountingCompute()
        async with started(cache):
            waiting = asyncio.ensure_future(cache.get_or_compute(key_for(), compute))
            await asyncio.sleep(1.5)  # 1.5 lock lifetimes: the live holder keeps extending its lock
            assert compute.calls == 0 and not waiting.done()
            holder.kill()
            value, hit = await waiting
        assert compute.calls == 1 and value == compute.values[0] and hit is False
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


async def test_holder_failure_lets_the_other_replica_compute_at_once(namespace: str) -> None:
    a, b = make_cache(namespace, lock_ttl=30.0), make_cache(namespace, poll_min=10.0, poll_max=10.0)
    failing = CountingCompute(error=OptimizerError("boom"), gate=asyncio.Event())
    working = CountingCompute()
    async with started(a, b):
        await until(lambda: a.subscribed and b.subscribed)
        on_a = asyncio.ensure_future(a.get_or_compute(key_for(), failing))
        await until(lambda: failing.calls == 1)
        on_b = asyncio.ensure_future(b.get_or_compute(key_for(), working))
        await until(lambda: key_for() in b._waiters)
        failing.gate.set()  # type: ignore[union-attr]
        with pytest.raises(OptimizerError):
            await on_a
        # Neither the 30 s lock nor the 10 s poll delays b: the failure notice wakes it.
        value, hit = await asyncio.wait_for(on_b, 5.0)
    assert working.calls == 1 and value == working.values[0] and not hit


async def until_breaker_closes(cache: RedisCache, compute: CountingCompute, timeout: float = 15.0) -> None:
    """Keep serving new prompts (each may be the breaker's probe) until Redis is back in use."""
    deadline = time.monotonic() + timeout
    while cache.status()["breaker"] != "closed":
        assert time.monotonic() < deadline, "the breaker never closed"
        await cache.get_or_compute(f"probe-{time.monotonic()}", compute)
        await asyncio.sleep(0.05)


async def test_redis_killed_then_restarted(own_redis: Any) -> None:
    events = Events()
    cache = make_cache("ns", url=own_redis.url, events=events, poll_max=0.05,
                       breaker=CircuitBreaker(cooldown_seconds=0.2))
    compute = CountingCompute()
    async with started(cache):
        await cache.get_or_compute("warm", compute)
        own_redis.kill()
        for index in range(10):
            value, hit = await cache.get_or_compute(f"cold-{index}", compute)
            assert value == compute.values[-1] and not hit
        assert compute.calls == 11
        assert cache.status()["breaker"] == "open" and cache.status()["state"] == "degraded"
        errors = events["error"]
        assert 3 <= errors < 10  # the breaker stopped paying a Redis round trip per request
        assert (await cache.get_or_compute("warm", compute))[1] is True  # the local tier still serves

        own_redis.start()
        await until_breaker_closes(cache, compute)
        await cache.get_or_compute("after-restart", compute)
        other = make_cache("ns", url=own_redis.url)
        async with started(other):
            assert (await other.get_or_compute("after-restart", compute))[1] is True
            await until(lambda: cache.subscribed)  # the pub/sub listener reconnected as well


async def test_stale_pooled_connections_after_a_restart_are_not_faults(own_redis: Any) -> None:
    events = Events()
    writer, reader = make_cache("ns", url=own_redis.url), make_cache("ns", url=own_redis.url, events=events)
    compute = CountingCompute()
    async with started(writer, reader):
        await asyncio.gather(*(reader.get_or_compute(f"warm-{i}", compute) for i in range(4)))  # 4 pooled
        own_redis.kill()
        own_redis.start()
        # First thing after the restart, before the loop has seen the old sockets close.
        assert (await reader.get_or_compute("first", compute))[1] is False
        await writer.get_or_compute("shared", compute)
        assert await reader.get_or_compute("shared", compute) == (compute.values[-1], True)
    assert events["error"] == 0 and reader.status()["breaker"] == "closed"


async def test_redis_paused_costs_short_timeouts_then_nothing(own_redis: Any) -> None:
    events = Events()
    cache = make_cache("ns", url=own_redis.url, events=events, op_timeout=0.2)
    compute = CountingCompute()
    async with started(cache):
        own_redis.pause()
        for index in range(8):
            assert (await cache.get_or_compute(f"k{index}", compute))[0] == compute.values[-1]
        assert cache.status()["breaker"] == "open" and 3 <= events["error"] < 8
        assert "Timeout" in cache.status()["last_error"]
        own_redis.resume()
        await until_breaker_closes(cache, compute)


async def test_a_server_speaking_garbage_fails_open(upstream: Any) -> None:
    events = Events()
    cache = make_cache("ns", url=f"redis://127.0.0.1:{upstream.port}/0", events=events)
    compute = CountingCompute()
    async with started(cache):
        for index in range(5):
            value, hit = await cache.get_or_compute(f"k{index}", compute)
            assert value == compute.values[-1] and not hit
    assert compute.calls == 5 and events["error"] >= 1 and events["miss"] == 5


def test_status_hides_credentials() -> None:
    cache = make_cache("ns", url="redis://user:s3cret@10.0.0.5:6380/2")
    status = cache.status()
    assert status["url"] == "redis://10.0.0.5:6380/2" and "s3cret" not in str(status)
    assert redact_url("rediss://:pw@host/0") == "rediss://host/0"


def test_an_unusable_url_fails_at_build_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match=r"--cache redis://host:port/0: not a usable Redis URL"):
        build_cache(CacheOptions("redis://user:pw@host:port/0"), Events())


async def test_peek_sees_only_the_local_tier(namespace: str) -> None:
    a, b = make_cache(namespace), make_cache(namespace)
    compute = CountingCompute()
    async with started(a, b):
        await a.get_or_compute(key_for(), compute)
        assert a.peek(key_for()) == compute.values[0]
        assert b.peek(key_for()) is None  # in Redis, but peeking never does I/O
        await b.get_or_compute(key_for(), compute)
        assert b.peek(key_for()) == compute.values[0]


async def test_a_computation_nobody_waits_for_stops_and_frees_the_lock(namespace: str,
                                                                       shared_redis: redis.Redis) -> None:
    cache = make_cache(namespace)
    compute = CountingCompute(gate=asyncio.Event())
    async with started(cache):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.get_or_compute(key_for(), compute), 0.2)
        await asyncio.wait_for(compute.finished.wait(), 30)  # cancelled: no caller is left to want it
        await until(lambda: shared_redis.get(cache.lock_key(key_for())) is None)
        await until(lambda: cache.status()["in_flight"] == 0)
        assert compute.values == []
