"""One rewrite from prompt to verdict: length limit, cache, optimizer deadline, fidelity guard, fail open."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from optimizer.base import Mode, Optimizer, OptimizerBusy, OptimizerError, OptimizerUnavailable
from optimizer.cache import CachedRewrite, RewriteCache, cache_key
from optimizer.guard import check_rewrite
from optimizer.reasons import (
    BUSY,
    GUARD_REJECTED,
    OPTIMIZER_ERROR,
    OPTIMIZER_UNAVAILABLE,
    TIMEOUT,
    TOO_LONG,
    TRUNCATED,
    UNCHANGED,
)
from optimizer.stages import CACHE_LOOKUP, GUARD, OPTIMIZER_CALL, Attributes, Stage, StageTracer

log = logging.getLogger("bpo.optimizer")

CacheResult = Literal["hit", "miss", "off"]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON readers pair valid escapes: what is left is lone
_HIT: Attributes = {"bpo.cache": "hit"}  # built once: a stage's attributes cost no allocation per request
_MISS: Attributes = {"bpo.cache": "miss"}


def well_formed(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD.

    A client's JSON may escape half a surrogate pair (``"\\ud800"``): valid JSON, but no character, and no
    UTF-8 encoder (cache key, Redis, tokenizer, logs, headers) takes it. The optimizer sees the replacement.
    """
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


@dataclass(slots=True)  # not frozen: built on every request, and a frozen dataclass costs 4x to build
class Outcome:
    """What to send upstream for one prompt, and why."""

    text: str
    applied: bool
    reason: str | None
    cache: CacheResult
    optimizer: str
    # A guard rejection: the rule that failed and the rewrite it refused (for X-BPO-Debug and events only).
    guard_rule: str | None = None
    rejected: str | None = None


class RewritePipeline:
    """Turns a prompt into an :class:`Outcome`; never raises for optimizer or cache faults.

    ``stages``: told of the cache lookup, the optimizer call and the guard (the gateway's trace spans);
    None costs one ``is None`` test per stage.
    """

    def __init__(self, optimizer: Optimizer, cache: RewriteCache, *, timeout: float, max_chars: int,
                 on_optimizer_seconds: Callable[[str, float], None] | None = None,
                 on_fail_open: Callable[[str], None] | None = None, stages: StageTracer | None = None) -> None:
        self.optimizer = optimizer
        self.cache = cache
        self.timeout = timeout
        self.max_chars = max_chars
        self.stages = stages
        self._on_seconds = on_optimizer_seconds or (lambda backend, seconds: None)
        self._on_fail_open = on_fail_open or (lambda component: None)

    async def run(self, text: str, mode: Mode, tenant: str = "") -> Outcome:
        optimizer = self.optimizer.identity
        if len(text) > self.max_chars:
            return Outcome(text, False, TOO_LONG, "off", optimizer)
        text = well_formed(text)
        cache_state: CacheResult = "miss" if self.cache.enabled else "off"
        key = cache_key(optimizer, mode, text, tenant)
        # Ends when the cache has answered, or when it hands over to the optimizer (a miss computed here).
        lookup = None if self.stages is None or not self.cache.enabled else self.stages.start(CACHE_LOOKUP)
        cached = self.cache.peek(key)
        if cached is not None:
            if lookup is not None:
                lookup.end(_HIT)
            return self._verdict(text, cached, "hit")
        try:
            value, hit = await asyncio.wait_for(
                self.cache.get_or_compute(key, lambda: self._compute(text, mode, lookup)), self.timeout)
            if lookup is not None:  # ended already if this request computed; else another tier or request did
                lookup.end(_HIT if hit else _MISS)
        except TimeoutError:
            # "miss": the computation goes on while another request waits for it, else it is stopped (load shedding).
            return self._fail_open(text, TIMEOUT, cache_state, optimizer, "optimizer")
        # Failures are not cached, so the cache took no part: "off", not a "miss" that promises a later hit.
        except OptimizerUnavailable:
            return Outcome(text, False, OPTIMIZER_UNAVAILABLE, "off", optimizer)
        except OptimizerBusy:
            return Outcome(text, False, BUSY, "off", optimizer)
        except OptimizerError as exc:
            log.warning("optimizer failed: %s", exc)
            return self._fail_open(text, OPTIMIZER_ERROR, "off", optimizer, "optimizer")
        except Exception:  # fail open: a fault in the optimizer or cache never fails the request
            log.exception("rewrite failed; forwarding the original prompt")
            return self._fail_open(text, OPTIMIZER_ERROR, "off", optimizer, "optimizer")
        finally:
            if lookup is not None:  # a deadline or a fault before the cache answered: ended without an outcome
                lookup.end()
        if self.cache.enabled:
            cache_state = "hit" if hit else "miss"
        return self._verdict(text, value, cache_state)

    async def recall(self, text: str, mode: Mode, tenant: str = "") -> str | None:
        """The rewrite the cache holds for ``text`` under the current optimizer, if it was applied; never an
        optimizer call (a conversation's earlier turns are replayed with it). Cache faults fail open: None."""
        if len(text) > self.max_chars:
            return None
        try:
            value = await self.cache.lookup(cache_key(self.optimizer.identity, mode, text, tenant))
        except Exception:  # fail open: the turn is sent as the client wrote it
            log.exception("history lookup failed; sending the turn as it is")
            self._on_fail_open("cache")
            return None
        return value.text if value is not None and value.verdict == "applied" else None

    @staticmethod
    def _verdict(text: str, value: CachedRewrite, cache: CacheResult) -> Outcome:
        if value.verdict == "applied":
            return Outcome(value.text, True, None, cache, value.optimizer)
        if value.verdict == GUARD_REJECTED:
            return Outcome(text, False, value.verdict, cache, value.optimizer, value.guard_rule, value.text or None)
        return Outcome(text, False, value.verdict, cache, value.optimizer)

    def _fail_open(self, text: str, reason: str, cache: CacheResult, optimizer: str, component: str) -> Outcome:
        self._on_fail_open(component)
        return Outcome(text, False, reason, cache, optimizer)

    async def _compute(self, text: str, mode: Mode, lookup: Stage | None = None) -> CachedRewrite:
        if lookup is not None:
            lookup.end(_MISS)
        call = None if self.stages is None else self.stages.start(OPTIMIZER_CALL)
        started = time.perf_counter()
        try:
            rewrite = await self.optimizer.optimize(text, mode)
        except BaseException as exc:  # cancelled too (the deadline, load shedding): the stage still ends
            if call is not None:
                call.end(error=exc)
            raise
        # The backend from the identity of the call, so a hot reload to another backend is labelled right.
        backend = rewrite.optimizer.partition(":")[0]
        self._on_seconds(backend, time.perf_counter() - started)
        if call is not None:
            call.end({"bpo.optimizer": rewrite.optimizer, "bpo.optimizer.backend": backend,
                      "bpo.optimizer.batch_size": rewrite.batch_size, "bpo.optimizer.truncated": rewrite.truncated})
        if rewrite.truncated:
            log.info("dropped a rewrite cut at its token budget")
            return CachedRewrite("", TRUNCATED, rewrite.optimizer, time.time())
        candidate = well_formed(rewrite.text).strip()
        if not candidate or candidate == text.strip():
            return CachedRewrite("", UNCHANGED, rewrite.optimizer, time.time())
        guard = None if self.stages is None else self.stages.start(GUARD)
        verdict = check_rewrite(text, candidate)
        if guard is not None:
            guard.end({"bpo.guard.verdict": "accepted" if verdict.accepted else "rejected",
                       "bpo.guard.rule": verdict.rule})
        if not verdict.accepted:  # kept with its rule, so a debug request or an event can show what was refused
            return CachedRewrite(candidate, GUARD_REJECTED, rewrite.optimizer, time.time(), verdict.rule)
        return CachedRewrite(candidate, "applied", rewrite.optimizer, time.time())
