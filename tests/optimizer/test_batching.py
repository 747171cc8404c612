"""The dynamic batcher with a plain Python runner: merging, bounds, keys, cancellation, failures, close."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest

from optimizer.base import OptimizerUnavailable
from optimizer.batching import DynamicBatcher


class GatedRunner:
    """Upper-cases its items; while the gate is shut, the worker blocks inside the first batch it takes."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.abandoned_seen: list[bool] = []

    def __call__(self, items: Sequence[str], abandoned: Callable[[int], bool]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        self.gate.wait(10)
        self.abandoned_seen.extend(abandoned(i) for i in range(len(items)))
        return [RuntimeError("bad item") if item == "boom" else item.upper() for item in items]


async def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.fixture
def runner() -> GatedRunner:
    return GatedRunner()


async def test_requests_queued_while_busy_go_out_as_one_batch(runner: GatedRunner) -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(runner, max_batch_size=8, max_wait_ms=0, on_batch=sizes.append)
    first = asyncio.create_task(batcher.submit("a"))
    await wait_for(runner.started.is_set)
    rest = [asyncio.create_task(batcher.submit(t)) for t in "bcdef"]
    await asyncio.sleep(0.05)
    runner.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == list("BCDEF")
    batcher.close()
    assert runner.batches == [["a"], list("bcdef")]
    assert sizes == [1, 5]


async def test_batch_size_is_bounded_and_order_kept(runner: GatedRunner) -> None:
    batcher = DynamicBatcher(runner, max_batch_size=3, max_wait_ms=0)
    first = asyncio.create_task(batcher.submit("x"))
    await wait_for(runner.started.is_set)
    rest = [asyncio.create_task(batcher.submit(t)) for t in "abcdefg"]
    await asyncio.sleep(0.05)
    runner.gate.set()
    await asyncio.gather(first, *rest)
    batcher.close()
    assert runner.batches == [["x"], ["a", "b", "c"], ["d", "e", "f"], ["g"]]


async def test_wait_gathers_concurrent_arrivals_into_one_batch(runner: GatedRunner) -> None:
    runner.gate.set()
    batcher = DynamicBatcher(runner, max_batch_size=4, max_wait_ms=600_000)
    # A full batch leaves at once, without waiting out the 10 minutes (a busy machine takes seconds, not those).
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(t) for t in "abcd")), 60)
    batcher.close()
    assert results == list("ABCD")
    assert runner.batches == [list("abcd")]


async def test_items_of_another_key_wait_for_their_own_batch(runner: GatedRunner) -> None:
    batcher = DynamicBatcher(runner, max_batch_size=8, max_wait_ms=0, key=lambda item: item.isdigit())
    first = asyncio.create_task(batcher.submit("x"))
    await wait_for(runner.started.is_set)
    rest = [asyncio.create_task(batcher.submit(t)) for t in ["a", "1", "b", "2", "c"]]
    await asyncio.sleep(0.05)
    runner.gate.set()
    await asyncio.gather(first, *rest)
    batcher.close()
    assert runner.batches == [["x"], ["a", "b", "c"], ["1", "2"]]


async def test_cancelled_request_is_skipped_before_and_flagged_during_its_batch(runner: GatedRunner) -> None:
    batcher = DynamicBatcher(runner, max_batch_size=8, max_wait_ms=0)
    running = asyncio.create_task(batcher.submit("running"))
    await wait_for(runner.started.is_set)
    queued = asyncio.create_task(batcher.submit("queued"))
    kept = asyncio.create_task(batcher.submit("kept"))
    await asyncio.sleep(0.02)
    running.cancel()
    queued.cancel()
    await asyncio.sleep(0.02)
    runner.gate.set()
    assert await kept == "KEPT"
    batcher.close()
    assert runner.batches == [["running"], ["kept"]]
    assert runner.abandoned_seen == [True, False]
    assert running.cancelled() and queued.cancelled()


async def test_runner_errors_fail_only_their_own_item_and_batch(runner: GatedRunner) -> None:
    runner.gate.set()
    batcher = DynamicBatcher(runner, max_batch_size=4, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit(t) for t in ["ok", "boom"]), return_exceptions=True)
    assert results[0] == "OK" and isinstance(results[1], RuntimeError)

    def broken(items: Sequence[str], abandoned: Callable[[int], bool]) -> list[str]:
        raise ValueError("whole batch failed")

    broken_batcher: DynamicBatcher[str, str] = DynamicBatcher(broken, max_batch_size=4, max_wait_ms=0)
    with pytest.raises(ValueError, match="whole batch"):
        await broken_batcher.submit("a")
    assert await batcher.submit("still works") == "STILL WORKS"
    batcher.close()
    broken_batcher.close()


async def test_close_fails_queued_requests_and_refuses_new_ones(runner: GatedRunner) -> None:
    batcher = DynamicBatcher(runner, max_batch_size=1, max_wait_ms=0)
    running = asyncio.create_task(batcher.submit("running"))
    await wait_for(runner.started.is_set)
    queued = asyncio.create_task(batcher.submit("queued"))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close))
    await wait_for(lambda: batcher.closed)  # close() runs on a thread: it must have begun before the gate opens
    runner.gate.set()
    await closing
    # The running batch saw the shutdown as abandonment; the queued request was failed, not dropped.
    assert runner.abandoned_seen == [True]
    assert await running == "RUNNING"
    with pytest.raises(OptimizerUnavailable):
        await queued
    with pytest.raises(OptimizerUnavailable):
        await batcher.submit("late")


async def test_least_seconds_until_done_counts_the_running_batch_and_the_queue(runner: GatedRunner) -> None:
    batcher = DynamicBatcher(runner, max_batch_size=2, max_wait_ms=0)
    assert batcher.least_seconds_until_done(1.5) == 1.5  # idle: only its own generation
    running = asyncio.create_task(batcher.submit("a", cost=100.0))
    await wait_for(runner.started.is_set)
    queued = [asyncio.create_task(batcher.submit(t, cost=c)) for t, c in (("b", 3.0), ("c", 1.0), ("d", 2.0))]
    await wait_for(lambda: len(batcher._queue) == 3)
    # ~100 s left of the running batch, then [b, c] (3 s), then [d, new] (max 2, 5 = 5 s).
    estimate = batcher.least_seconds_until_done(5.0)
    assert 100.0 + 3.0 + 5.0 - 60.0 < estimate <= 100.0 + 3.0 + 5.0
    runner.gate.set()
    await asyncio.gather(running, *queued)
    assert batcher.least_seconds_until_done(1.0) == 1.0
    await asyncio.to_thread(batcher.close)
