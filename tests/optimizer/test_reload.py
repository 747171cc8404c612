"""Hot reload: a new optimizer loads beside the serving one and takes over without failing a request."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from optimizer.base import Mode, OptimizerOptions, OptimizerStatus, OptimizerUnavailable, Rewrite, State
from optimizer.manifest import Manifest, write_manifest
from optimizer.registry import SpecError
from optimizer.reload import ReloadableOptimizer, ReloadError, install_sighup


@dataclass
class FakeOptimizer:
    """A hand-written optimizer: rewrites ``text`` to ``text [identity]``, optionally holding each request."""

    identity: str
    state: State = "loading"
    load_to: State = "ready"
    gate: asyncio.Event | None = None
    closed: bool = False
    served: list[str] = field(default_factory=list)

    def status(self) -> OptimizerStatus:
        return OptimizerStatus(self.state, self.identity, "fake")

    load_seconds: float = 0.05

    async def start(self) -> None:
        asyncio.get_running_loop().call_later(self.load_seconds, setattr, self, "state", self.load_to)

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        if self.closed or self.state != "ready":
            raise OptimizerUnavailable(f"{self.identity} is not serving")
        if self.gate is not None:
            await self.gate.wait()
        self.served.append(text)
        return Rewrite(f"{text} [{self.identity}]", self.identity)

    async def close(self) -> None:
        self.closed = True


class FakeBuilds:
    """``build_optimizer`` stand-in: spec ``fake:NAME`` builds ``NAME@<n>``; ``fake:broken`` fails to load."""

    def __init__(self) -> None:
        self.built: list[FakeOptimizer] = []
        self.load_seconds = 0.05

    def __call__(self, spec: str, options: OptimizerOptions) -> FakeOptimizer:
        kind, _, name = spec.partition(":")
        if kind != "fake":
            raise SpecError(f"unknown optimizer spec {spec!r}")
        optimizer = FakeOptimizer(f"{name}@{len(self.built) + 1}", load_to="failed" if name == "broken" else "ready",
                                  load_seconds=self.load_seconds)
        self.built.append(optimizer)
        return optimizer


async def until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Yield to the loop until ``condition`` holds (an ordering aid, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def started(spec: str = "fake:bpo") -> tuple[ReloadableOptimizer, FakeBuilds]:
    builds = FakeBuilds()
    optimizer = ReloadableOptimizer(spec, OptimizerOptions(), build=builds)
    await optimizer.start()
    while optimizer.status().state == "loading":
        await asyncio.sleep(0.01)
    return optimizer, builds


async def test_in_flight_request_finishes_on_the_old_optimizer_which_then_retires() -> None:
    optimizer, builds = await started()
    old = builds.built[0]
    old.gate = asyncio.Event()
    in_flight = asyncio.create_task(optimizer.optimize("first", "stable"))
    await asyncio.sleep(0.01)
    result = await optimizer.reload("fake:bpo-v2")
    assert (result.previous, result.current, result.spec) == ("bpo@1", "bpo-v2@2", "fake:bpo-v2")
    assert optimizer.identity == "bpo-v2@2" and optimizer.spec == "fake:bpo-v2"
    # New requests go to the new optimizer at once; the old one is still open for its request.
    assert (await optimizer.optimize("second", "stable")).optimizer == "bpo-v2@2"
    assert not old.closed
    old.gate.set()
    assert (await in_flight).text == "first [bpo@1]"
    await asyncio.sleep(0.01)
    assert old.closed
    await optimizer.close()
    assert builds.built[1].closed


async def test_failed_load_keeps_the_old_optimizer_serving() -> None:
    optimizer, builds = await started()
    with pytest.raises(ReloadError, match="fake:broken is failed"):
        await optimizer.reload("fake:broken")
    assert builds.built[1].closed and not builds.built[0].closed
    assert (await optimizer.optimize("hi", "stable")).optimizer == "bpo@1"
    with pytest.raises(SpecError):
        await optimizer.reload("nonsense:x")
    await optimizer.close()


async def test_reload_without_spec_reloads_the_same_spec_and_status_shows_progress() -> None:
    optimizer, builds = await started()
    builds.load_seconds = 3600  # the candidate loads when the test says so, however slow the machine
    reloading = asyncio.create_task(optimizer.reload())
    await until(lambda: len(builds.built) == 2)
    assert optimizer.status().state == "ready"
    assert optimizer.status().detail.endswith("reloading fake:bpo")
    builds.built[1].state = "ready"
    result = await reloading
    assert result.current == "bpo@2" and optimizer.status().detail == "fake"
    await optimizer.close()


async def test_sighup_reloads_the_current_spec() -> None:
    optimizer, _builds = await started()
    uninstall = install_sighup(optimizer)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: optimizer.identity == "bpo@2")
    finally:
        uninstall()
        await optimizer.close()


def versioned_copy(source: Path, target: Path, version: str) -> Path:
    model_dir = Path(shutil.copytree(source, target))
    write_manifest(model_dir, Manifest(name="bpo-tiny", version=version, base_model="tiny",
                                       data_sha256="0" * 64, template_version="1", created="2026-01-01T00:00:00Z"))
    return model_dir


@pytest.mark.slow
async def test_reload_real_models_under_load_fails_no_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = versioned_copy(tiny_model_dir, tmp_path / "v1", "1")
    second = versioned_copy(tiny_model_dir, tmp_path / "v2", "2")
    options = OptimizerOptions(max_new_tokens=4, max_batch_size=4, max_wait_ms=2)
    optimizer = ReloadableOptimizer(f"hf:{first}", options)
    await optimizer.start()
    while optimizer.status().state == "loading":
        await asyncio.sleep(0.02)
    assert optimizer.identity == "hf:bpo-tiny@1"
    served: list[tuple[bool, str]] = []  # (started after the swap, optimizer that served it)
    swapped = stop = False

    async def client(index: int) -> None:
        while not stop:
            after_swap = swapped
            rewrite = await optimizer.optimize(f"prompt {index}", "aggressive" if index % 2 else "stable")
            served.append((after_swap, rewrite.optimizer))

    def served_after_swap() -> int:
        return sum(started_after for started_after, _ in served)

    clients = [asyncio.create_task(client(i)) for i in range(6)]
    try:
        # Conditions, not fixed sleeps: on a busy machine one generate call can outlast any short pause.
        await until(lambda: len(served) >= 6)
        result = await optimizer.reload(f"hf:{second}")
        # Nothing else ran between the swap inside reload() and this line: later requests must see v2.
        swapped = True
        assert (result.previous, result.current) == ("hf:bpo-tiny@1", "hf:bpo-tiny@2")
        await until(lambda: served_after_swap() >= 6)
    finally:
        stop = True
        outcomes = await asyncio.gather(*clients, return_exceptions=True)
    assert outcomes == [None] * 6  # not one request failed
    assert (False, "hf:bpo-tiny@1") in served
    after = [name for started_after, name in served if started_after]
    assert after and set(after) == {"hf:bpo-tiny@2"}
    await optimizer.close()
