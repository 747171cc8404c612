"""The pipeline's stages, as a tracer sees them: cache lookup, optimizer call (backend, batch size), guard."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from optimizer.base import Mode, OptimizerError, OptimizerStatus, Rewrite
from optimizer.cache import LocalTier, MemoryCache, NullCache, RewriteCache
from optimizer.pipeline import RewritePipeline
from optimizer.stages import CACHE_LOOKUP, GUARD, NO_ATTRIBUTES, OPTIMIZER_CALL, Attributes

PROMPT = "Suggest a name for a bakery in Lyon"


@dataclass
class RecordedStage:
    name: str
    log: list[str]
    attributes: dict[str, object] = field(default_factory=dict)
    error: BaseException | None = None
    ends: int = 0

    def end(self, attributes: Attributes = NO_ATTRIBUTES, error: BaseException | None = None) -> None:
        if self.ends == 0:
            self.attributes.update(attributes)
            self.error = error
            self.log.append(f"end {self.name}")
        self.ends += 1


@dataclass
class RecordingStages:
    """A ``StageTracer`` that keeps every stage and the order of starts and ends."""

    stages: list[RecordedStage] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def start(self, name: str, attributes: Attributes = NO_ATTRIBUTES) -> RecordedStage:
        self.log.append(f"start {name}")
        stage = RecordedStage(name, self.log, dict(attributes))
        self.stages.append(stage)
        return stage

    def named(self, name: str) -> list[RecordedStage]:
        return [stage for stage in self.stages if stage.name == name]


@dataclass
class ScriptedOptimizer:
    """Answers with a fixed rewrite and batch size, or raises, or waits on ``gate``."""

    rewrite: str = "Suggest three names for a bakery in Lyon, each with a one-line reason."
    batch_size: int | None = 3
    error: Exception | None = None
    gate: asyncio.Event | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    identity: str = "hf:bpo-test@1"

    def status(self) -> OptimizerStatus:
        return OptimizerStatus("ready", self.identity)

    async def start(self) -> None:
        return None

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.error is not None:
            raise self.error
        return Rewrite(self.rewrite, self.identity, batch_size=self.batch_size)

    async def close(self) -> None:
        return None


def pipeline(optimizer: ScriptedOptimizer, stages: RecordingStages, cache: RewriteCache | None = None,
             timeout: float = 30.0) -> RewritePipeline:
    cache = cache if cache is not None else MemoryCache(LocalTier(100, 1 << 20, 3600))
    return RewritePipeline(optimizer, cache, timeout=timeout, max_chars=8000, stages=stages)


async def test_a_miss_is_lookup_then_optimizer_then_guard_and_a_hit_is_the_lookup_alone() -> None:
    stages = RecordingStages()
    rewriting = pipeline(ScriptedOptimizer(), stages)

    assert (await rewriting.run(PROMPT, "stable")).applied
    assert stages.log == [f"start {CACHE_LOOKUP}", f"end {CACHE_LOOKUP}", f"start {OPTIMIZER_CALL}",
                          f"end {OPTIMIZER_CALL}", f"start {GUARD}", f"end {GUARD}"]
    lookup, call, guard = stages.stages
    assert lookup.attributes == {"bpo.cache": "miss"}
    assert call.attributes == {"bpo.optimizer": "hf:bpo-test@1", "bpo.optimizer.backend": "hf",
                               "bpo.optimizer.batch_size": 3, "bpo.optimizer.truncated": False}
    assert guard.attributes == {"bpo.guard.verdict": "accepted", "bpo.guard.rule": None}

    stages.stages.clear()
    stages.log.clear()
    assert (await rewriting.run(PROMPT, "stable")).cache == "hit"
    assert [(stage.name, stage.attributes) for stage in stages.stages] == [(CACHE_LOOKUP, {"bpo.cache": "hit"})]
    assert all(stage.ends >= 1 and stage.error is None for stage in stages.stages)


async def test_a_rejected_rewrite_names_the_guard_rule() -> None:
    stages = RecordingStages()
    outcome = await pipeline(ScriptedOptimizer(rewrite="Write a poem about the sea."), stages).run(
        "Translate 'ERR_CODE_42' into French", "stable")
    assert outcome.reason == "guard-rejected"
    (guard,) = stages.named(GUARD)
    assert guard.attributes["bpo.guard.verdict"] == "rejected"
    assert guard.attributes["bpo.guard.rule"] == outcome.guard_rule is not None


async def test_a_failed_optimizer_call_ends_its_stage_with_the_error() -> None:
    stages = RecordingStages()
    failure = OptimizerError("backend answered 500")
    outcome = await pipeline(ScriptedOptimizer(error=failure), stages).run(PROMPT, "stable")
    assert outcome.reason == "optimizer-error"
    (call,) = stages.named(OPTIMIZER_CALL)
    assert call.error is failure and call.ends == 1
    assert stages.named(GUARD) == []
    (lookup,) = stages.named(CACHE_LOOKUP)
    assert lookup.attributes == {"bpo.cache": "miss"} and lookup.ends >= 1


async def test_past_the_deadline_the_shed_call_still_ends_its_stage() -> None:
    stages = RecordingStages()
    optimizer = ScriptedOptimizer(gate=asyncio.Event())
    outcome = await pipeline(optimizer, stages, timeout=0.05).run(PROMPT, "stable")
    assert outcome.reason == "timeout"
    await asyncio.wait_for(optimizer.cancelled.wait(), 10)  # nobody waits any more: the call is cancelled
    await asyncio.sleep(0)
    (call,) = stages.named(OPTIMIZER_CALL)
    assert isinstance(call.error, asyncio.CancelledError)


@pytest.mark.parametrize("batch_size", [None, 1])
async def test_without_a_cache_there_is_no_lookup_stage(batch_size: int | None) -> None:
    stages = RecordingStages()
    outcome = await pipeline(ScriptedOptimizer(batch_size=batch_size), stages, cache=NullCache()).run(
        PROMPT, "stable")
    assert outcome.applied and outcome.cache == "off"
    assert [stage.name for stage in stages.stages] == [OPTIMIZER_CALL, GUARD]
    assert stages.stages[0].attributes["bpo.optimizer.batch_size"] == batch_size
