"""The rewrite's stages as a seam: cache lookup, optimizer call and guard, reported to whoever traces them.

``optimizer/`` imports no tracer. The gateway implements :class:`StageTracer` with OpenTelemetry spans
(``proxy/tracing.py``); without tracing the pipeline holds ``None`` and each stage costs one ``is None`` test:
no object, no call, no coroutine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

CACHE_LOOKUP = "bpo.cache.lookup"
OPTIMIZER_CALL = "bpo.optimizer"
GUARD = "bpo.guard"

# Attribute values a tracer can export; None means "not known" and is left out.
AttributeValue = str | int | float | bool | None
Attributes = Mapping[str, AttributeValue]
NO_ATTRIBUTES: Attributes = {}


class Stage(Protocol):
    """One stage begun; it ends once, with what it found (later calls to ``end`` do nothing)."""

    def end(self, attributes: Attributes = NO_ATTRIBUTES, error: BaseException | None = None) -> None: ...


class StageTracer(Protocol):
    """Begins stages. A stage's parent is the caller's current trace context (the gateway's ``bpo.rewrite``)."""

    def start(self, name: str, attributes: Attributes = NO_ATTRIBUTES) -> Stage: ...
