"""The in-process rewrite cache: keys, LRU bounds, TTL, single-flight, shielding, and build_cache."""

from __future__ import annotations

import asyncio

import pytest

from optimizer.base import OptimizerError
from optimizer.cache import (
    CachedRewrite,
    CacheOptions,
    LocalTier,
    MemoryCache,
    NullCache,
    RewriteCache,
    build_cache,
    cache_key,
    entry_size,
    tenant_of,
)
from proxy.app import cache_options
from proxy.settings import Settings
from tests.optimizer.cache_helpers import CountingCompute, Events, FakeClock, rewrite, until


def test_key_depends_on_everything_that_decides_the_rewrite() -> None:
    base = cache_key("bpo@1", "stable", "Tell me a joke")
    variants = [
        cache_key("bpo@2", "stable", "Tell me a joke"),
        cache_key("bpo@1", "aggressive", "Tell me a joke"),
        cache_key("bpo@1", "stable", "Tell me a joke "),
        cache_key("bpo@1", "stable", "Tell me a joke", tenant="t1"),
        cache_key("bpo@1", "stable", "Tell me a joke", template_version="999"),
    ]
    assert base == cache_key("bpo@1", "stable", "Tell me a joke")
    assert len({base, *variants}) == 6
    assert "joke" not in base and len(base) == 64


def test_key_fields_cannot_bleed_into_each_other() -> None:
    assert cache_key("a", "b", "c|d") != cache_key("a", "b|c", "d")
    assert cache_key("bpo@1", "stable", "x", tenant="") != cache_key("bpo@1", "stable", "x", tenant=" ")


def test_tenant_id_is_stable_and_hides_the_key() -> None:
    assert tenant_of("sk-secret") == tenant_of("sk-secret")
    assert tenant_of("sk-secret") != tenant_of("sk-other")
    assert "secret" not in tenant_of("sk-secret")


async def test_hit_after_miss_and_events() -> None:
    events = Events()
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600), events)
    compute = CountingCompute()
    first = await cache.get_or_compute("k", compute)
    second = await cache.get_or_compute("k", compute)
    assert first == (compute.values[0], False)
    assert second == (compute.values[0], True)
    assert compute.calls == 1
    assert events == {"miss": 1, "hit": 1}


async def test_negative_verdicts_are_cached() -> None:
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600))
    for verdict in ("unchanged", "guard-rejected"):
        compute = CountingCompute(lambda n, v=verdict: rewrite("", v, guard_rule="length" if v != "unchanged"
                                                               else None))
        await cache.get_or_compute(verdict, compute)
        value, hit = await cache.get_or_compute(verdict, compute)
        assert hit and value.verdict == verdict and compute.calls == 1


async def test_lru_evicts_least_recently_used_by_entries() -> None:
    cache = MemoryCache(LocalTier(2, 1 << 20, 3600))
    compute = CountingCompute()
    for key in ("a", "b"):
        await cache.get_or_compute(key, compute)
    await cache.get_or_compute("a", compute)  # touch a: b is now the oldest
    await cache.get_or_compute("c", compute)
    assert compute.calls == 3
    assert (await cache.get_or_compute("a", compute))[1] is True
    assert (await cache.get_or_compute("b", compute))[1] is False
    assert cache.status()["entries"] == 2 and cache.status()["evictions"] == 2


def test_lru_is_bounded_by_bytes() -> None:
    value = rewrite("x" * 1000)
    budget = entry_size("k0", value) * 3 + 10
    tier = LocalTier(1000, budget, 3600)
    for index in range(10):
        tier.put(f"k{index}", value)
    assert len(tier) == 3 and tier.bytes <= budget
    assert tier.get("k9") == value and tier.get("k0") is None
    tier.put("huge", rewrite("y" * budget))  # larger than the whole budget: not stored, nothing evicted
    assert tier.get("huge") is None and len(tier) == 3


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock(1000.0)
    tier = LocalTier(10, 1 << 20, ttl_seconds=60, clock=clock)
    tier.put("k", rewrite("hello", created=1000.0))
    clock.now = 1059.0
    assert tier.get("k") is not None
    clock.now = 1060.0
    assert tier.get("k") is None and len(tier) == 0 and tier.bytes == 0


async def test_forty_concurrent_identical_keys_cost_one_compute() -> None:
    events = Events()
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600), events)
    compute = CountingCompute(gate=asyncio.Event())
    callers = [asyncio.ensure_future(cache.get_or_compute("same", compute)) for _ in range(40)]
    await asyncio.sleep(0)
    compute.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*callers)
    assert compute.calls == 1
    assert {value for value, _ in results} == {compute.values[0]}
    assert sorted(hit for _, hit in results) == [False] + [True] * 39
    assert events == {"miss": 1, "hit": 39}


async def test_compute_error_reaches_every_waiter_and_is_not_cached() -> None:
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600))
    failing = CountingCompute(error=OptimizerError("model crashed"), gate=asyncio.Event())
    callers = [asyncio.ensure_future(cache.get_or_compute("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    failing.gate.set()  # type: ignore[union-attr]
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert failing.calls == 1
    assert all(isinstance(o, OptimizerError) and str(o) == "model crashed" for o in outcomes)
    working = CountingCompute()
    value, hit = await cache.get_or_compute("k", working)
    assert working.calls == 1 and not hit and value == working.values[0]


async def test_a_caller_that_gives_up_never_cancels_the_shared_computation() -> None:
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600))
    compute = CountingCompute(gate=asyncio.Event())
    impatient = asyncio.ensure_future(asyncio.wait_for(cache.get_or_compute("k", compute), 0.01))
    await until(lambda: compute.calls == 1)  # the impatient caller started the computation
    patient = asyncio.ensure_future(cache.get_or_compute("k", compute))
    with pytest.raises(asyncio.TimeoutError):
        await impatient
    compute.gate.set()  # type: ignore[union-attr]
    value, hit = await patient
    assert value == compute.values[0] and hit is True and compute.calls == 1


async def test_computation_is_cancelled_when_every_caller_gave_up() -> None:
    # Nobody waits any more: the optimizer must stop (issue 14: abandoned generations ran on for a minute).
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600))
    compute = CountingCompute(gate=asyncio.Event())
    callers = [asyncio.ensure_future(cache.get_or_compute("k", compute)) for _ in range(2)]
    await until(lambda: compute.calls == 1)
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert not compute.finished.is_set() and cache.status()["in_flight"] == 1  # one caller still waits
    callers[1].cancel()
    await asyncio.wait_for(compute.finished.wait(), 5)
    await asyncio.gather(*callers, return_exceptions=True)
    assert compute.values == [] and cache.status()["in_flight"] == 0
    # The next request computes afresh.
    value, hit = await cache.get_or_compute("k", CountingCompute())
    assert hit is False and value.text == "rewrite #1"


async def test_close_cancels_computations_in_flight() -> None:
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600))
    compute = CountingCompute(gate=asyncio.Event())
    caller = asyncio.ensure_future(cache.get_or_compute("k", compute))
    await asyncio.sleep(0)
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cache.status()["in_flight"] == 0


async def test_null_cache_always_computes() -> None:
    cache = NullCache()
    compute = CountingCompute()
    assert (await cache.get_or_compute("k", compute))[1] is False
    assert (await cache.get_or_compute("k", compute))[1] is False
    assert compute.calls == 2 and cache.enabled is False
    assert cache.status() == {"backend": "none", "state": "off"}


def test_build_cache_follows_settings() -> None:
    events = Events()
    memory = build_cache(CacheOptions("memory", max_entries=7, max_bytes=9999), events)
    assert isinstance(memory, MemoryCache) and isinstance(memory, RewriteCache)
    assert memory.enabled and memory.status()["max_entries"] == 7 and memory.status()["max_bytes"] == 9999
    off = build_cache(CacheOptions("none"), events)
    assert isinstance(off, NullCache) and not off.enabled


def test_cached_rewrite_is_immutable() -> None:
    value = CachedRewrite("t", "applied", "bpo@1", 1.0)
    with pytest.raises(AttributeError):
        value.text = "other"  # type: ignore[misc]


async def test_peek_reads_the_local_tier_without_a_task_and_counts_only_hits() -> None:
    events = Events()
    cache = MemoryCache(LocalTier(100, 1 << 20, 3600), events)
    assert cache.peek("k") is None and events == {}
    compute = CountingCompute()
    await cache.get_or_compute("k", compute)
    assert cache.peek("k") == compute.values[0]
    assert events == {"miss": 1, "hit": 1}
    assert NullCache().peek("k") is None


def test_cache_options_default_to_the_gateways_settings() -> None:
    """optimizer/ takes no gateway Settings; its defaults must still be the --cache* flags' defaults."""
    assert cache_options(Settings()) == CacheOptions()
