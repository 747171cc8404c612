"""Small hand-written doubles for the cache tests: a counting computation and a settable clock."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis

from optimizer.cache import CachedRewrite, CacheVerdict
from tests.fakes.upstream import free_port


def rewrite(text: str = "improved", verdict: CacheVerdict = "applied", optimizer: str = "fake@1",
            created: float | None = None, guard_rule: str | None = None) -> CachedRewrite:
    return CachedRewrite(text, verdict, optimizer, time.time() if created is None else created, guard_rule)


class Events(Counter[str]):
    """An ``on_event`` callback that counts hit / miss / error."""

    def __call__(self, event: str) -> None:
        self[event] += 1


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


class CountingCompute:
    """A stand-in optimizer call: counts calls, can wait on a gate, can fail."""

    def __init__(self, make: Callable[[int], CachedRewrite] | None = None, *,
                 gate: asyncio.Event | None = None, error: Exception | None = None) -> None:
        self.make = make or (lambda n: rewrite(f"rewrite #{n}"))
        self.gate = gate
        self.error = error
        self.calls = 0
        self.values: list[CachedRewrite] = []
        self.finished = asyncio.Event()

    async def __call__(self) -> CachedRewrite:
        self.calls += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            value = self.make(self.calls)
            self.values.append(value)
            return value
        finally:
            self.finished.set()


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Yield to the loop until ``condition`` holds (an ordering aid, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.001)


class RedisServer:
    """A private ``redis-server`` on a free port, for tests that kill, pause or restart it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            os.kill(self.process.pid, signal.SIGCONT)
            self.paused = False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


async def _hold_forever(url: str, namespace: str, key: str, lock_ttl: float) -> None:
    """Be the replica that takes the lock and then never finishes (the test SIGKILLs this process)."""
    from optimizer.cache import LocalTier
    from optimizer.redis_cache import RedisCache

    cache = RedisCache(url, LocalTier(10, 1 << 20, 3600), namespace=namespace, lock_ttl=lock_ttl)
    await cache.start()

    async def compute() -> CachedRewrite:
        print("computing", flush=True)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    await cache.get_or_compute(key, compute)


if __name__ == "__main__":
    import sys

    asyncio.run(_hold_forever(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
