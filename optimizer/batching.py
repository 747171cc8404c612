"""Dynamic batching: concurrent requests gathered into bounded batches, run on one worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from optimizer.base import OptimizerUnavailable

log = logging.getLogger("bpo.optimizer.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")
# The batch runner: given the batch's items and a "has row i been abandoned?" probe, returns one result
# (or one exception) per item. It runs on the worker thread and may block for as long as generation takes.
RunBatch = Callable[[Sequence[Item], Callable[[int], bool]], Sequence["Result | BaseException"]]


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    key: Hashable
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    cost: float = 0.0  # a lower bound on its generation's seconds (0: unknown)
    enqueued: float = field(default_factory=time.monotonic)

    def abandoned(self) -> bool:
        # Read from the worker thread: a cancelled future only ever stays cancelled, so a stale read is harmless.
        return self.future.done()

    def settle(self, outcome: Result | BaseException) -> None:
        # A closed event loop means nobody is waiting for this result any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, outcome)


def _settle(future: asyncio.Future[Result], outcome: Result | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class DynamicBatcher(Generic[Item, Result]):
    """Queues items from the event loop; one thread takes up to ``max_batch_size`` items of the same key.

    A batch starts as soon as it is full, or when its oldest item has waited ``max_wait_ms``; items that
    queued while the worker was busy therefore go out at once. Items with another key (another decoding
    mode) wait for the next batch, in order. A caller that gives up cancels its future; the worker skips it
    if its batch has not started, and the runner's probe reports it abandoned if it has.
    """

    def __init__(self, run_batch: RunBatch[Item, Result], *, max_batch_size: int, max_wait_ms: float,
                 key: Callable[[Item], Hashable] = lambda item: None,
                 on_batch: Callable[[int], None] | None = None, name: str = "bpo-batcher") -> None:
        self._run_batch = run_batch
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self._key = key
        self._on_batch = on_batch
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._running_until = 0.0  # monotonic: when the running batch's longest item can end at the earliest
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def least_seconds_until_done(self, cost: float) -> float:
        """A lower bound on the seconds an item of ``cost`` submitted now needs to be done.

        The running batch's rest, then the queue (this item last) in batches of ``max_batch_size``, each
        as long as its longest item. It ignores that modes never share a batch, so it never overestimates.
        """
        with self._ready:
            running = max(0.0, self._running_until - time.monotonic())
            costs = [p.cost for p in self._queue if not p.abandoned()] + [cost]
        size = self.max_batch_size
        return running + sum(max(costs[i:i + size]) for i in range(0, len(costs), size))

    async def submit(self, item: Item, cost: float = 0.0) -> Result:
        loop = asyncio.get_running_loop()
        pending = _Pending[Item, Result](item, self._key(item), loop.create_future(), loop, cost)
        with self._ready:
            if self._closed:
                raise OptimizerUnavailable("the optimizer is shutting down")
            self._queue.append(pending)
            self._ready.notify()
        return await pending.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, fail what is queued, let the running batch see itself abandoned, join."""
        with self._ready:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        for pending in queued:
            pending.settle(OptimizerUnavailable("the optimizer is shutting down"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Pending[Item, Result]] | None:
        with self._ready:
            while True:
                self._drop_abandoned()
                if self._closed:
                    return None
                if not self._queue:
                    self._ready.wait()
                    continue
                head = self._queue[0]
                same_key = sum(1 for p in self._queue if p.key == head.key)
                remaining = head.enqueued + self.max_wait - time.monotonic()
                if same_key >= self.max_batch_size or remaining <= 0:
                    return self._take(head.key)
                self._ready.wait(remaining)

    def _drop_abandoned(self) -> None:
        if any(p.abandoned() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.abandoned())

    def _take(self, key: Hashable) -> list[_Pending[Item, Result]]:
        batch: list[_Pending[Item, Result]] = []
        rest: deque[_Pending[Item, Result]] = deque()
        for pending in self._queue:
            (batch if pending.key == key and len(batch) < self.max_batch_size else rest).append(pending)
        self._queue = rest
        return batch

    def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))

        def abandoned(index: int) -> bool:
            return self._closed or batch[index].abandoned()

        self._running_until = time.monotonic() + max(p.cost for p in batch)
        try:
            outcomes = list(self._run_batch([p.item for p in batch], abandoned))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch runner returned {len(outcomes)} results for {len(batch)} items")
        except Exception as exc:  # one bad batch fails its own requests, never the worker
            log.exception("batch of %d failed", len(batch))
            outcomes = [exc] * len(batch)
        self._running_until = 0.0
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.settle(outcome)
