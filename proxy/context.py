"""What one request on a rewriting route carries through the pipeline: ``RequestContext``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.ab import ArmDecision
from proxy.clients import ClientContext, Meter
from proxy.forward import Exchange, Target
from proxy.protocol import WireRequest
from proxy.shapes import Shape


@dataclass(slots=True)
class Rewritten:
    """The body to send and how the rewrite went, for headers, metrics and events."""

    body: dict[str, Any] | None  # None: send the client's bytes as they came
    applied: bool
    reason: str | None
    cache: str
    optimizer: str
    optimized_text: str | None
    guard_rule: str | None = None  # the guard's rule, when it rejected the rewrite
    rejected_text: str | None = None  # the rejected rewrite: X-BPO-Debug and events with text only
    history_replayed: int = 0  # earlier user turns sent as their cached rewrite (--rewrite-history)


@dataclass(slots=True)
class RequestContext:
    """One request, from its parsed body to its accounting: built once, passed whole."""

    shape: Shape
    request_id: str
    headers: dict[str, str]  # the client's, lower-case names
    arrived: float  # perf_counter at arrival
    request: WireRequest
    api_key: str | None
    decision: ArmDecision
    target: Target
    client: ClientContext | None = None  # the client key, when client auth is on
    meter: Meter | None = None  # its spend for this request, settled when the response is complete
    rewritten: Rewritten = field(default_factory=lambda: Rewritten(None, False, None, "off", "", None))
    exchange: Exchange = field(default_factory=Exchange)
    sent: float = 0.0  # perf_counter when the request left for the upstream
