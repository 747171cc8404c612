"""Hot reload: load a new optimizer beside the serving one, swap atomically, retire the old one when idle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from optimizer.base import (
    Mode,
    Optimizer,
    OptimizerError,
    OptimizerOptions,
    OptimizerStatus,
    Rewrite,
    wait_until_settled,
)
from optimizer.registry import build_optimizer

log = logging.getLogger("bpo.optimizer.reload")

Build = Callable[[str, OptimizerOptions], Optimizer]
# Long enough for a 7B model from local disk; a reload that takes longer leaves the old model serving.
DEFAULT_LOAD_TIMEOUT = 900.0


class ReloadError(OptimizerError):
    """The new optimizer did not become ready; the old one keeps serving."""


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: the identities before and after, and the new optimizer's status."""

    previous: str
    current: str
    spec: str
    status: OptimizerStatus


class _Lease:
    """One optimizer and the number of requests it is serving right now."""

    def __init__(self, optimizer: Optimizer, spec: str) -> None:
        self.optimizer = optimizer
        self.spec = spec
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def acquire(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class ReloadableOptimizer:
    """An :class:`Optimizer` whose model can be replaced while it serves, without failing a request.

    Each request runs to completion on the optimizer it started on; new requests go to the new one
    from the instant of the swap. The old optimizer is closed once its last request has finished.
    """

    def __init__(self, spec: str, options: OptimizerOptions, *, build: Build = build_optimizer,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT) -> None:
        self.options = options
        self._build = build
        self.load_timeout = load_timeout
        self._lease = _Lease(build(spec, options), spec)
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._reloading: str | None = None

    @property
    def spec(self) -> str:
        return self._lease.spec

    @property
    def current(self) -> Optimizer:
        return self._lease.optimizer

    @property
    def identity(self) -> str:
        return self._lease.optimizer.identity

    def status(self) -> OptimizerStatus:
        status = self._lease.optimizer.status()
        if self._reloading is None:
            return status
        note = f"reloading {self._reloading}"
        return OptimizerStatus(status.state, status.optimizer, f"{status.detail}; {note}" if status.detail else note,
                               status.speed)

    async def start(self) -> None:
        await self._lease.optimizer.start()

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        lease = self._lease
        lease.acquire()
        try:
            return await lease.optimizer.optimize(text, mode)
        finally:
            lease.release()

    async def reload(self, spec: str | None = None) -> ReloadResult:
        """Load ``spec`` (default: the current spec again, e.g. new weights in the same dir) and swap to it.

        Raises :class:`ReloadError` when it fails to load; the serving optimizer is untouched then.
        Reloads are serialized: a second one waits for the first.
        """
        async with self._reload_lock:
            spec = spec or self.spec
            self._reloading = spec
            try:
                candidate = self._build(spec, self.options)
                status = await self._load(candidate, spec)
            finally:
                self._reloading = None
            previous, self._lease = self._lease, _Lease(candidate, spec)
            log.info("optimizer reloaded: %s -> %s", previous.optimizer.identity, candidate.identity)
            self._retire(previous)
            return ReloadResult(previous.optimizer.identity, candidate.identity, spec, status)

    async def close(self) -> None:
        await self._lease.optimizer.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def _load(self, candidate: Optimizer, spec: str) -> OptimizerStatus:
        try:
            await candidate.start()
            await asyncio.wait_for(wait_until_settled(candidate), self.load_timeout)
        except TimeoutError as exc:
            await candidate.close()
            raise ReloadError(f"{spec} did not load within {self.load_timeout:g} s") from exc
        except BaseException:
            await candidate.close()
            raise
        status = candidate.status()
        if status.state != "ready":
            await candidate.close()
            raise ReloadError(f"{spec} is {status.state}: {status.detail}")
        return status

    def _retire(self, lease: _Lease) -> None:
        async def drain_then_close() -> None:
            await lease.idle.wait()
            await lease.optimizer.close()
            log.info("retired optimizer %s", lease.optimizer.identity)

        task = asyncio.create_task(drain_then_close(), name=f"bpo-retire-{lease.optimizer.identity}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def install_sighup(optimizer: ReloadableOptimizer) -> Callable[[], None]:
    """Reload on SIGHUP (same spec: new weights in the same place). Returns the uninstaller.

    A no-op where the platform has no SIGHUP or the loop cannot take signal handlers (Windows).
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            result = await optimizer.reload()
            log.info("SIGHUP: now serving %s", result.current)
        except ReloadError as exc:
            log.warning("SIGHUP reload failed, still serving %s: %s", optimizer.identity, exc)

    def on_signal() -> None:
        task = loop.create_task(reload(), name="bpo-sighup-reload")
        pending.add(task)
        task.add_done_callback(pending.discard)

    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None:
        return lambda: None
    try:
        loop.add_signal_handler(hangup, on_signal)
    except (NotImplementedError, RuntimeError, ValueError):
        return lambda: None

    def uninstall() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(hangup)

    return uninstall
