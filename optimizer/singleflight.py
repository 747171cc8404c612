"""In-process single-flight: concurrent callers of one key share one shielded computation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("bpo.cache")

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One running task per key; callers await it through :meth:`wait`.

    The computation runs in its own task, not in the first caller's, so a caller that is cancelled
    (the pipeline's ``asyncio.wait_for`` deadline) never cancels the work the others wait on. When the
    last caller gives up, nobody waits any more: the computation is cancelled, so an optimizer past its
    deadline stops generating (load shedding) instead of running on for a cache entry nobody asked for.
    """

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Task[T]] = {}
        self._waiting: dict[asyncio.Task[T], int] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str, start: Callable[[], Awaitable[T]]) -> tuple[asyncio.Task[T], bool]:
        """The task computing ``key`` and whether this call started it. Synchronous on purpose:
        no await between the lookup and the registration, so two callers can never both start."""
        task = self._flights.get(key)
        if task is not None:
            return task, False
        task = asyncio.ensure_future(start())
        self._flights[key] = task
        task.add_done_callback(lambda done: self._finish(key, done))
        return task, True

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Await the shared computation of ``key``; returns (value, started_by_this_call)."""
        task, started = self.join(key, start)
        return await self.wait(task), started

    async def wait(self, task: asyncio.Task[T], abandon: Callable[[], bool] = lambda: True) -> T:
        """Await ``task`` as one of its callers; the last caller to give up cancels it if ``abandon()``
        (a task that only waits for another replica's result costs nothing and may go on filling the cache)."""
        self._waiting[task] = self._waiting.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._waiting.pop(task) - 1
            if left:
                self._waiting[task] = left
            elif not task.done() and abandon():
                task.cancel()

    def _finish(self, key: str, task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        # Mark the exception retrieved: when every caller gave up, nobody else will look at it.
        if not task.cancelled() and task.exception() is not None:
            log.debug("shared computation failed: %r", task.exception())

    async def close(self) -> None:
        """Cancel computations still running (shutdown) and wait for them to unwind."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
