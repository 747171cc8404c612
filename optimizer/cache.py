"""The rewrite cache: keys, values, the in-process LRU tier, and the backend chosen by ``--cache``."""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from optimizer.singleflight import SingleFlight
from optimizer.template import TEMPLATE_VERSION

CacheVerdict = Literal["applied", "unchanged", "guard-rejected", "truncated"]
CACHE_VERDICTS: tuple[CacheVerdict, ...] = ("applied", "unchanged", "guard-rejected", "truncated")

EventCallback = Callable[[str], None]
Compute = Callable[[], Awaitable["CachedRewrite"]]

# Bump when the key derivation changes, so old entries simply stop matching.
KEY_SCHEMA = "k1"
# What one entry costs besides its strings: the dataclass, the OrderedDict node, the expiry float.
ENTRY_OVERHEAD_BYTES = 240


@dataclass(frozen=True)
class CachedRewrite:
    """The outcome of optimizing one prompt; negative verdicts are cached too."""

    text: str  # the rewrite: sent upstream only when verdict == "applied"; a guard-rejected one is kept for debug
    verdict: CacheVerdict
    optimizer: str  # name@version that produced it
    created: float  # unix time
    guard_rule: str | None = None


def cache_key(optimizer: str, mode: str, text: str, tenant: str = "", *,
              template_version: str = TEMPLATE_VERSION) -> str:
    """A SHA-256 over everything that decides the rewrite; the prompt itself is never stored."""
    material = orjson.dumps([KEY_SCHEMA, optimizer, mode, template_version, tenant, text])
    return hashlib.sha256(material).hexdigest()


def tenant_of(api_key: str) -> str:
    """A stable, non-reversible tenant id for an API key (``--cache-per-tenant``)."""
    return hashlib.sha256(b"bpo-tenant:" + api_key.encode()).hexdigest()[:32]


@runtime_checkable
class RewriteCache(Protocol):
    """Where rewrites are remembered; ``get_or_compute`` is single-flight and never cancels shared work."""

    enabled: bool

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[CachedRewrite, bool]:
        """(value, hit): ``hit`` is True when this call cost no optimizer call of its own."""
        ...

    def peek(self, key: str) -> CachedRewrite | None:
        """The in-process tier's value, without awaiting: the hot path's cache hit costs no task."""
        ...

    async def lookup(self, key: str) -> CachedRewrite | None:
        """Every tier's value, never computing one (replaying a conversation's history); not counted as a hit
        or miss, and a tier that fails counts as holding nothing."""
        ...

    def status(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def entry_size(key: str, value: CachedRewrite) -> int:
    """Approximate memory of one entry, for the byte bound."""
    strings = (key, value.text, value.optimizer, value.guard_rule or "")
    return ENTRY_OVERHEAD_BYTES + sum(sys.getsizeof(s) for s in strings)


class LocalTier:
    """A least-recently-used map bounded by entries and bytes, with per-entry expiry."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CachedRewrite, float, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedRewrite | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires, _ = entry
        if self._clock() >= expires:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: CachedRewrite) -> None:
        size = entry_size(key, value)
        if size > self.max_bytes or self.max_entries <= 0:
            return
        self._remove(key)
        # Expiry follows the value's creation time, so a rewrite fetched from Redis late in its life
        # does not outlive the shared copy here.
        self._entries[key] = (value, value.created + self.ttl_seconds, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def status(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "evictions": self.evictions}


class MemoryCache:
    """``--cache memory``: the in-process LRU with in-process single-flight."""

    enabled = True
    backend = "memory"

    def __init__(self, local: LocalTier, on_event: EventCallback | None = None) -> None:
        self.local = local
        self._on_event = on_event if on_event is not None else _ignore
        self._flights: SingleFlight[CachedRewrite] = SingleFlight()

    def peek(self, key: str) -> CachedRewrite | None:
        value = self.local.get(key)
        if value is not None:
            self._on_event("hit")
        return value

    async def lookup(self, key: str) -> CachedRewrite | None:
        return self.local.get(key)

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[CachedRewrite, bool]:
        value = self.peek(key)
        if value is not None:
            return value, True
        task, started = self._flights.join(key, lambda: self._compute_and_store(key, compute))
        if not started:
            self._on_event("hit")  # coalesced: this request costs no optimizer call of its own
        return await self._flights.wait(task), not started

    async def _compute_and_store(self, key: str, compute: Compute) -> CachedRewrite:
        self._on_event("miss")
        value = await compute()
        self.local.put(key, value)
        return value

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "state": "ok", "in_flight": len(self._flights),
                **self.local.status()}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._flights.close()
        self.local.clear()


class NullCache:
    """``--cache none``: every call computes; the proxy answers ``X-BPO-Cache: off``."""

    enabled = False
    backend = "none"

    def peek(self, key: str) -> CachedRewrite | None:
        return None

    async def lookup(self, key: str) -> CachedRewrite | None:
        return None

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[CachedRewrite, bool]:
        return await compute(), False

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "state": "off"}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class CacheOptions:
    """What ``build_cache`` needs; the gateway fills it from its ``--cache*`` settings (same defaults)."""

    spec: str = "memory"  # memory | none | a Redis URL
    ttl_seconds: int = 7 * 24 * 3600
    namespace: str = "bpo"
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024


def build_cache(options: CacheOptions, on_event: EventCallback) -> RewriteCache:
    """The cache ``options.spec`` names: ``memory``, ``none`` or a Redis URL (two tiers)."""
    if options.spec == "none":
        return NullCache()
    local = LocalTier(options.max_entries, options.max_bytes, options.ttl_seconds)
    if options.spec == "memory":
        return MemoryCache(local, on_event)
    from optimizer.redis_cache import RedisCache  # only deployments with Redis pay for its import

    return RedisCache(options.spec, local, namespace=options.namespace,
                      ttl_seconds=options.ttl_seconds, on_event=on_event)


def _ignore(event: str) -> None:
    return None

