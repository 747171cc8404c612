"""Client gone, work stops: a request's optimizer wait and upstream call end when its client disconnects."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from starlette.types import Receive

OPTIMIZER: Final = "optimizer"
UPSTREAM: Final = "upstream"
# How long a request's work runs before its channel is watched: a client that leaves sooner is seen after
# between one and two of these. Measured with callgrind per request (a fast-path request is ~750k
# instructions): a listening task from the start (created, woken, cancelled) +57k, a cancelled timer per
# request +27k, a time-ordered queue of every request +28k (its entries kept each finished request's state
# alive for a tick, and the collector paid for that), this set of the requests in flight ~+5k.
WATCH_AFTER: Final = 0.05


class ClientGone(Exception):
    """The client disconnected while the gateway worked for it (``stage``); nobody is left to answer."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class DisconnectWatcher:
    """One ticker for all requests: a request still working two ticks after it began gets its channel watched.

    Fast requests (a cache hit, a quick upstream) finish before then and cost a set entry, not a task; a
    finished request leaves the set at once, so nothing of it outlives it. The ticker runs only while
    requests are in flight.
    """

    def __init__(self, after: float = WATCH_AFTER) -> None:
        self.after = after
        self.ticks = 0  # ticks so far; a request notes the count when it begins
        self._working: set[ClientWatch] = set()
        self._ticker: asyncio.Task[None] | None = None

    def watch(self, receive: Receive) -> ClientWatch:
        return ClientWatch(receive, self)

    def enter(self, watch: ClientWatch) -> None:
        self._working.add(watch)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def leave(self, watch: ClientWatch) -> None:
        self._working.discard(watch)

    async def _tick(self) -> None:
        try:
            while self._working:
                await asyncio.sleep(self.after)
                self.ticks += 1
                due = [watch for watch in self._working if watch.began < self.ticks - 1]
                for watch in due:
                    self._working.discard(watch)
                    watch.start()
        finally:
            self._ticker = None


class ClientWatch:
    """Listens on a request's ASGI receive channel for ``http.disconnect`` once its work has run a while.

    ``with watch.stage(name): await work`` runs the work in the request's own task; when the client leaves
    meanwhile, that task is cancelled, so the upstream connection closes (aiohttp closes a cancelled
    request's connection) and a request still waiting for its rewrite is never sent, and the stage ends in
    ``ClientGone(name)`` instead. The rewrite computation is the cache's (docs/cache.md): it goes on while
    another request waits for it, and stops when none does. The first stage comes after the body is read, so
    the channel is free. ``close()`` before the response is sent, which then has the channel to itself (a
    streamed answer watches for the disconnect on its own).

    A stage costs two attribute writes and a check, no coroutine of its own (``bench/README.md``: wrapping
    each stage's work in a coroutine cost ~37k instructions a request).
    """

    __slots__ = ("_cancelled", "_closed", "_listener", "_receive", "_stage", "_watcher", "_worker", "began", "gone")

    def __init__(self, receive: Receive, watcher: DisconnectWatcher) -> None:
        self.gone = False
        self._receive = receive
        self._watcher = watcher
        self._stage: str | None = None
        self._cancelled = False
        self._closed = False
        self._worker: asyncio.Task[Any] | None = None  # set by the first stage
        self._listener: asyncio.Task[None] | None = None
        self.began = 0  # the watcher's tick count when the first stage began

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

    def stage(self, name: str) -> ClientWatch:
        """The request's work is now ``name`` (use as ``with``): a client that left already is ClientGone."""
        if self.gone:
            raise ClientGone(name)
        if self._worker is None:
            self._worker = asyncio.current_task()
            self.began = self._watcher.ticks
            self._watcher.enter(self)
        self._stage = name
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        stage, self._stage = self._stage, None
        if kind is None:
            if self.gone:  # left as the work finished: its result has no one to go to
                self._uncancel()
                raise ClientGone(stage or "")
        elif kind is asyncio.CancelledError and self._uncancel():  # ours alone (not a shutdown's too)
            raise ClientGone(stage or "") from None

    def _uncancel(self) -> bool:
        """Withdraws this watch's cancellation; True when no other cancellation is pending."""
        if not self._cancelled or self._worker is None:
            return False
        self._cancelled = False
        return self._worker.uncancel() == 0

    def close(self) -> None:
        self._closed = True
        self._watcher.leave(self)
        if self._listener is not None:
            self._listener.cancel()
