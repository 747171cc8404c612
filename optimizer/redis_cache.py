"""The two-tier rewrite cache: the in-process LRU in front of Redis, single-flight across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from optimizer.breaker import CircuitBreaker
from optimizer.cache import CACHE_VERDICTS, CachedRewrite, Compute, EventCallback, LocalTier
from optimizer.singleflight import SingleFlight
from optimizer.urls import redact_url

log = logging.getLogger("bpo.cache")

T = TypeVar("T")
VALUE_SCHEMA = 1
# Lua keeps "is it still my lock?" and the change atomic; a lock taken over by another replica
# after ours expired must never be extended or deleted by us.
EXTEND_LOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
               "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
RELEASE_LOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('del', KEYS[1]) else return 0 end")
# The errors that mean "Redis is unwell" (refused, reset, timed out, protocol garbage, OOM ...).
REDIS_FAULTS = (RedisError, OSError, asyncio.TimeoutError)


class RedisUnavailable(Exception):
    """Redis cannot be used for this step (fault, or circuit open); the caller goes on without it."""


def encode_value(value: CachedRewrite) -> bytes:
    """The stored JSON: the rewrite and its metadata; never the prompt."""
    return orjson.dumps({"v": VALUE_SCHEMA, "text": value.text, "verdict": value.verdict,
                         "optimizer": value.optimizer, "created": value.created,
                         "guard_rule": value.guard_rule})


def decode_value(raw: bytes) -> CachedRewrite | None:
    """The value, or None when the bytes are not a value this version wrote (corrupt = a miss)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("v") != VALUE_SCHEMA:
        return None
    text, verdict, optimizer = data.get("text"), data.get("verdict"), data.get("optimizer")
    created, rule = data.get("created"), data.get("guard_rule")
    if not (isinstance(text, str) and isinstance(optimizer, str) and verdict in CACHE_VERDICTS):
        return None
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
        return None
    if rule is not None and not isinstance(rule, str):
        return None
    return CachedRewrite(text, verdict, optimizer, float(created), rule)


# Longest wait for closing a connection to a Redis that may have stopped answering.
CLOSE_TIMEOUT = 2.0


class RedisCache:
    """``--cache redis://...``: LRU tier, then Redis; one optimizer call per key across replicas.

    Cross-replica single-flight: the first replica to ``SET lock NX PX`` computes and keeps the lock
    alive while it does; the others wait for its result on a pub/sub channel, polling with backoff as a
    fallback, and take the lock over when it expires (the holder died). Every Redis fault is logged,
    counted (``on_event("error")``) and swallowed: the request goes on with the local tier and a direct
    computation, and the circuit breaker keeps a dead Redis from costing a timeout per request.
    """

    enabled = True
    backend = "redis"

    def __init__(self, url: str, local: LocalTier, *, namespace: str = "bpo", ttl_seconds: float = 7 * 86400,
                 on_event: EventCallback | None = None, op_timeout: float = 0.25, lock_ttl: float = 3.0,
                 max_wait: float = 30.0, poll_min: float = 0.02, poll_max: float = 0.5,
                 breaker: CircuitBreaker | None = None) -> None:
        self.url = redact_url(url)
        self.local = local
        self.namespace = namespace
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.lock_ttl_ms = max(1, int(lock_ttl * 1000))
        self.max_wait = max_wait
        self.poll_min, self.poll_max = poll_min, poll_max
        self.breaker = breaker or CircuitBreaker()
        self._on_event = on_event if on_event is not None else _ignore
        # Short socket timeouts, and no retry of timeouts: a slow Redis must cost one short wait, after
        # which the breaker takes over (redis-py's default retry would sleep seconds per call). One
        # immediate retry of connection errors, because after a Redis restart every pooled connection is
        # stale and fails once; the retry reconnects instead of turning each of them into a miss.
        try:
            self._client = aioredis.Redis.from_url(
                url, socket_timeout=op_timeout, socket_connect_timeout=op_timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), client_name="bpo-cache")
        except ValueError as exc:
            raise ValueError(f"--cache {self.url}: not a usable Redis URL ({exc})") from exc
        self._channel = f"{namespace}:rewrite-done"
        self._flights: SingleFlight[tuple[CachedRewrite, bool]] = SingleFlight()
        # Keys this process is computing (not waiting on another replica for): those stop when nobody waits.
        self._computing: set[str] = set()
        self._waiters: dict[str, asyncio.Future[CachedRewrite | None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = False
        self.pubsub_drops = 0
        self.errors = 0
        self.corrupt_values = 0
        self.last_error = ""

    def value_key(self, key: str) -> str:
        return f"{self.namespace}:rewrite:{key}"

    def lock_key(self, key: str) -> str:
        return f"{self.namespace}:lock:{key}"

    # -- the protocol -------------------------------------------------------------------------------

    def peek(self, key: str) -> CachedRewrite | None:
        cached = self.local.get(key)
        if cached is not None:
            self._on_event("hit")
        return cached

    async def lookup(self, key: str) -> CachedRewrite | None:
        cached = self.local.get(key)
        if cached is not None:
            return cached
        try:
            found = await self._get(key)
        except RedisUnavailable:  # already logged and counted: the history turn is sent as it is
            return None
        if found is not None:
            self.local.put(key, found)
        return found

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[CachedRewrite, bool]:
        cached = self.peek(key)
        if cached is not None:
            return cached, True
        task, started = self._flights.join(key, lambda: self._resolve(key, compute))
        if not started:
            self._on_event("hit")  # coalesced: this request costs no optimizer call of its own
        value, computed = await self._flights.wait(task, lambda: key in self._computing)
        return value, not (started and computed)

    def status(self) -> dict[str, Any]:
        breaker = self.breaker.state
        return {"backend": self.backend, "state": "ok" if breaker == "closed" else "degraded",
                "url": self.url, "namespace": self.namespace, "breaker": breaker,
                "breaker_opened": self.breaker.opened_count, "errors": self.errors,
                "last_error": self.last_error, "corrupt_values": self.corrupt_values,
                "subscribed": self.subscribed, "pubsub_drops": self.pubsub_drops,
                "in_flight": len(self._flights), "local": self.local.status()}

    async def start(self) -> None:
        self._listener = asyncio.ensure_future(self._listen())
        try:
            await self._redis(self._client.ping)
        except RedisUnavailable:
            log.warning("cache: Redis at %s is not answering; serving from the local tier", self.url)

    async def close(self) -> None:
        # Bounded: a Redis that stopped answering must not hold up the gateway's shutdown.
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(self._listener, return_exceptions=True), CLOSE_TIMEOUT)
        await self._flights.close()
        with contextlib.suppress(asyncio.TimeoutError, *REDIS_FAULTS):
            await asyncio.wait_for(self._client.aclose(), CLOSE_TIMEOUT)
        self.local.clear()

    # -- one key's resolution (runs once per key per process, shielded from callers) ----------------

    async def _resolve(self, key: str, compute: Compute) -> tuple[CachedRewrite, bool]:
        """(value, computed here). Redis faults fall back to computing; compute errors propagate."""
        try:
            found = await self._find_or_lock(key)
        except RedisUnavailable:
            found = None
        if isinstance(found, CachedRewrite):
            self.local.put(key, found)
            self._on_event("hit")
            return found, False
        self._on_event("miss")
        return await self._compute_and_share(key, compute, token=found), True

    async def _find_or_lock(self, key: str) -> CachedRewrite | str | None:
        """The value (found, or published by the replica computing it), or our lock token.
        None: computing without the lock, because the holder has kept us waiting past ``max_wait``."""
        waiter = self._register_waiter(key)
        try:
            # The waiter exists before the first GET, so a result published after the GET is not lost.
            value = await self._get(key)
            deadline, delay = time.monotonic() + self.max_wait, self.poll_min
            while value is None:
                token = await self._try_lock(key)
                if token is not None:
                    return token
                if time.monotonic() > deadline:
                    log.warning("cache: gave up waiting for another replica's rewrite; computing it here")
                    return None
                value = await self._wait_for_publish(key, waiter, delay)
                waiter = self._waiters[key]
                delay = min(delay * 2, self.poll_max)
                if value is None:
                    value = await self._get(key)
            return value
        finally:
            self._waiters.pop(key, None)

    async def _wait_for_publish(self, key: str, waiter: asyncio.Future[CachedRewrite | None],
                                delay: float) -> CachedRewrite | None:
        """The published value, or None after ``delay`` or when the holder reported a failure."""
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), delay)
        except TimeoutError:
            return None
        finally:
            if waiter.done():  # a failure notice: listen again before retrying the lock
                self._register_waiter(key)

    async def _compute_and_share(self, key: str, compute: Compute, token: str | None) -> CachedRewrite:
        keeper = asyncio.ensure_future(self._keep_lock(key, token)) if token else None
        self._computing.add(key)
        try:
            value = await compute()
        except (Exception, asyncio.CancelledError):  # cancelled: every caller here gave up
            if token:  # let the waiting replicas try at once instead of at lock expiry
                await self._swallow(self._publish_failure(key, token))
            raise
        finally:
            self._computing.discard(key)
            if keeper is not None:
                keeper.cancel()
        self.local.put(key, value)
        await self._swallow(self._store(key, value, token))
        return value

    # -- Redis operations ---------------------------------------------------------------------------

    async def _redis(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation through the breaker; a fault is logged, counted and translated."""
        if not self.breaker.allow():
            raise RedisUnavailable("circuit open")
        try:
            result = await operation()
        except REDIS_FAULTS as exc:
            self._record_fault(exc)
            raise RedisUnavailable(str(exc)) from exc
        self.breaker.record_success()
        return result

    def _record_fault(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.breaker.record_failure()
        self._on_event("error")
        log.warning("cache: Redis fault (%s); continuing without it", self.last_error)

    async def _swallow(self, step: Awaitable[object]) -> None:
        with contextlib.suppress(RedisUnavailable):  # already logged and counted by _redis
            await step

    async def _get(self, key: str) -> CachedRewrite | None:
        raw = await self._redis(lambda: self._client.get(self.value_key(key)))
        if not isinstance(raw, bytes):
            return None
        value = decode_value(raw)
        if value is None:
            self.corrupt_values += 1
            log.warning("cache: ignoring a corrupt value under %s (treated as a miss)", self.value_key(key))
        return value

    async def _try_lock(self, key: str) -> str | None:
        token = secrets.token_hex(16)
        taken = await self._redis(lambda: self._client.set(self.lock_key(key), token, nx=True,
                                                           px=self.lock_ttl_ms))
        return token if taken else None

    async def _store(self, key: str, value: CachedRewrite, token: str | None) -> None:
        payload = encode_value(value)

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self.value_key(key), payload, px=self.ttl_ms)
                pipe.publish(self._channel, key.encode() + b"\n" + payload)
                if token:
                    pipe.eval(RELEASE_LOCK, 1, self.lock_key(key), token)
                await pipe.execute()

        await self._redis(write)

    async def _publish_failure(self, key: str, token: str) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.eval(RELEASE_LOCK, 1, self.lock_key(key), token)
                pipe.publish(self._channel, key.encode() + b"\n")
                await pipe.execute()

        await self._redis(write)

    async def _keep_lock(self, key: str, token: str) -> None:
        """Extend our lock while computing, so a slow optimizer is not mistaken for a dead replica."""
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            # A fault is counted by _redis; if the lock lapses another replica may compute too: only waste.
            with contextlib.suppress(RedisUnavailable):
                await self._redis(lambda: self._client.eval(EXTEND_LOCK, 1, self.lock_key(key), token,
                                                            str(self.lock_ttl_ms)))

    # -- pub/sub ------------------------------------------------------------------------------------

    def _register_waiter(self, key: str) -> asyncio.Future[CachedRewrite | None]:
        waiter: asyncio.Future[CachedRewrite | None] = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        return waiter

    def _deliver(self, message: bytes) -> None:
        key, _, payload = message.partition(b"\n")
        waiter = self._waiters.get(key.decode(errors="replace"))
        if waiter is not None and not waiter.done():
            waiter.set_result(decode_value(payload) if payload else None)

    async def _listen(self) -> None:
        """Deliver other replicas' results to our waiters; reconnect with backoff when Redis drops."""
        backoff = 0.05
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed, backoff = True, 0.05
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(message["data"])
            except REDIS_FAULTS as exc:
                # Fail open: without the subscription, waiters still find results by polling. Warn once
                # per outage; the reconnect attempts that follow would only repeat it.
                self.pubsub_drops += 1
                level = logging.WARNING if self.subscribed else logging.DEBUG
                log.log(level, "cache: Redis pub/sub dropped (%s: %s); waiters poll until it returns",
                        type(exc).__name__, exc)
            finally:
                self.subscribed = False
                await _close_quietly(pubsub)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(asyncio.TimeoutError, *REDIS_FAULTS):  # the connection is already gone
        await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT)


def _ignore(event: str) -> None:
    return None
