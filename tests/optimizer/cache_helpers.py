"""Small hand-written doubles for the cache tests: a counting computation and a settable clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from optimizer.cache import CachedRewrite, Verdict


def rewrite(text: str = "improved", verdict: Verdict = "applied", optimizer: str = "fake@1",
            created: float | None = None, guard_rule: str | None = None) -> CachedRewrite:
    return CachedRewrite(text, verdict, optimizer, time.time() if created is None else created, guard_rule)


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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition`` holds (an ordering aid, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.001)
