"""Client gone, work stops: a request's optimizer wait and upstream call end when its client disconnects."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from starlette.types import Receive

T = TypeVar("T")

OPTIMIZER: Final = "optimizer"
UPSTREAM: Final = "upstream"
# How long a request's work runs before its channel is watched. Measured with callgrind per request, two
# guarded stages included (a fast-path request is ~720k instructions): a listening task from the start
# (created, woken, cancelled) +57k, a cancelled timer per request +27k, this queue with one ticker +20k. A
# client that leaves sooner is still seen, up to twice this much later.
WATCH_AFTER: Final = 0.05


class ClientGone(Exception):
    """The client disconnected while the gateway worked for it (``stage``); nobody is left to answer."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class DisconnectWatcher:
    """One ticker for all requests: a request whose work has run ``after`` seconds gets its channel watched.

    Fast requests (a cache hit, a quick upstream) finish before then and cost one queue entry, not a task.
    The ticker runs only while requests wait in the queue.
    """

    def __init__(self, after: float = WATCH_AFTER) -> None:
        self.after = after
        self._queue: deque[tuple[float, ClientWatch]] = deque()  # oldest first; closed ones skipped
        self._ticker: asyncio.Task[None] | None = None

    def watch(self, receive: Receive) -> ClientWatch:
        return ClientWatch(receive, self)

    def enter(self, watch: ClientWatch) -> None:
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time(), watch))
        if self._ticker is None:
            self._ticker = loop.create_task(self._tick())

    async def _tick(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(self.after)
                due = asyncio.get_running_loop().time() - self.after
                while self._queue and self._queue[0][0] <= due:
                    self._queue.popleft()[1].start()
        finally:
            self._ticker = None


class ClientWatch:
    """Listens on a request's ASGI receive channel for ``http.disconnect`` once its work has run a while.

    ``guard(stage, work)`` runs ``work`` in the request's own task; when the client leaves meanwhile, that task
    is cancelled, so the upstream connection closes (aiohttp closes a cancelled request's connection) and a
    request still waiting for its rewrite is never sent. The rewrite computation is the cache's (docs/cache.md):
    it goes on while another request waits for it, and stops when none does. The first ``guard`` comes after
    the body is read, so the channel is free. ``close()`` before the response is sent, which then has the
    channel to itself (a streamed answer watches for the disconnect on its own).
    """

    __slots__ = ("_cancelled", "_closed", "_listener", "_receive", "_stage", "_watcher", "_worker", "gone")

    def __init__(self, receive: Receive, watcher: DisconnectWatcher) -> None:
        self.gone = False
        self._receive = receive
        self._watcher = watcher
        self._stage: str | None = None
        self._cancelled = False
        self._closed = False
        self._worker: asyncio.Task[Any] | None = None  # set by the first guard
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Called by the ticker once the work has run a while: from now on the channel is listened to."""
        if not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # the body is read already: nothing else is expected, and nothing else matters here
        self.gone = True
        if self._stage is not None and self._worker is not None:
            self._cancelled = True
            self._worker.cancel()

    async def guard(self, stage: str, work: Coroutine[Any, Any, T]) -> T:
        """``await work``, unless the client leaves first: then ``ClientGone(stage)``."""
        if self.gone:
            work.close()
            raise ClientGone(stage)
        if self._worker is None:
            self._worker = asyncio.current_task()
            self._watcher.enter(self)
        self._stage = stage
        try:
            result = await work
        except asyncio.CancelledError:
            if not self._uncancel():  # cancelled by someone else too (shutdown): let it through
                raise
            raise ClientGone(stage) from None
        finally:
            self._stage = None
        if self.gone:  # left as the work finished: its result has no one to go to
            self._uncancel()
            raise ClientGone(stage)
        return result

    def _uncancel(self) -> bool:
        """Withdraws this watch's cancellation; True when no other cancellation is pending."""
        if not self._cancelled or self._worker is None:
            return False
        self._cancelled = False
        return self._worker.uncancel() == 0

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
