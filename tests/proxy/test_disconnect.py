"""ClientWatch on a bare ASGI channel: fast work never listens; a disconnect during slow work is ClientGone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.disconnect import ClientGone, DisconnectWatcher


class Channel:
    """An ASGI receive channel whose client leaves when ``leave`` is set; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.leave = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def test_work_done_before_the_watch_starts_never_listens() -> None:
    channel = Channel()
    watch = DisconnectWatcher(after=0.05).watch(channel)
    with watch.stage("upstream"):
        assert await asyncio.sleep(0, "answer") == "answer"
    watch.close()
    await asyncio.sleep(0.2)  # the ticker ran past the entry: it was closed, so nothing started
    assert channel.calls == 0


async def test_a_disconnect_during_slow_work_cancels_it() -> None:
    channel = Channel()
    watch = DisconnectWatcher(after=0.01).watch(channel)
    work_cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            work_cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.1, channel.leave.set)
    with pytest.raises(ClientGone) as gone, watch.stage("optimizer"):
        await slow()
    watch.close()
    assert gone.value.stage == "optimizer" and work_cancelled.is_set()
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # the task goes on, answering 499
    started = False
    with pytest.raises(ClientGone), watch.stage("upstream"):  # nothing more is started for a client that left
        started = True
    assert not started


async def test_a_cancellation_from_elsewhere_still_cancels() -> None:
    watch = DisconnectWatcher(after=0.01).watch(Channel())

    async def work() -> None:
        with watch.stage("upstream"):
            await asyncio.sleep(3600)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watch.close()


async def test_work_that_finishes_despite_the_cancellation_is_still_client_gone() -> None:
    channel = Channel()
    watch = DisconnectWatcher(after=0.01).watch(channel)

    async def swallows_cancellation() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "answer"  # some work finishes anyway when cancelled; nobody is left to take its result
        return "never"

    asyncio.get_running_loop().call_later(0.05, channel.leave.set)
    with pytest.raises(ClientGone) as gone, watch.stage("upstream"):
        await swallows_cancellation()
    watch.close()
    assert gone.value.stage == "upstream"
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # no cancellation left for the next await
    await asyncio.sleep(0.01)
