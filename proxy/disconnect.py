"""Client gone, work stops: a request's optimizer wait and upstream call end when its client disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from starlette.types import Receive

T = TypeVar("T")

OPTIMIZER: Final = "optimizer"
UPSTREAM: Final = "upstream"


class ClientGone(Exception):
    """The client disconnected while the gateway worked for it (``stage``); nobody is left to answer."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class ClientWatch:
    """Listens on a request's ASGI receive channel for ``http.disconnect``, from its first ``guard`` on (by
    then the body is read: the channel is free).

    ``guard(stage, work)`` runs ``work`` in the request's own task; when the client leaves meanwhile, that task
    is cancelled, so the upstream connection closes (aiohttp closes a cancelled request's connection) and a
    request still waiting for its rewrite is never sent. The rewrite computation is the cache's (docs/cache.md):
    it goes on while another request waits for it, and stops when none does. ``close()`` before the response is sent,
    which then has the channel to itself (a streamed answer watches for the disconnect on its own).
    """

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._receive = receive
        self._stage: str | None = None
        self._cancelled = False
        self._worker: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None  # started by the first guard: the body is read by then

    async def _watch(self) -> None:
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
        if self._watcher is None:
            self._worker = asyncio.current_task()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
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
        if self._watcher is not None:
            self._watcher.cancel()
