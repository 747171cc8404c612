"""The optimizer seam: the protocol every backend implements and the values it trades in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Mode = Literal["stable", "aggressive"]
MODES: tuple[Mode, ...] = ("stable", "aggressive")

State = Literal["loading", "ready", "failed", "disabled"]


class OptimizerError(Exception):
    """The optimizer ran but could not produce a rewrite."""


class OptimizerUnavailable(OptimizerError):
    """The optimizer cannot serve right now (still loading, failed to load, backend unreachable)."""


class OptimizerBusy(OptimizerError):
    """The queue ahead cannot finish within the deadline: failing open now beats failing open late."""


@dataclass(frozen=True)
class Rewrite:
    """One optimized prompt and the optimizer (``name@version``) that wrote it.

    ``truncated``: generation stopped on its token budget, not on end-of-sequence or a stop string, so the
    text may have lost the end of the user's request; the pipeline never forwards it.
    ``batch_size``: how many prompts the batch that generated this one held (``hf:``, which batches); None
    where the backend does not batch or cannot tell (a ``remote:`` server batches out of our sight).
    """

    text: str
    optimizer: str
    truncated: bool = False
    batch_size: int | None = None


@dataclass(slots=True)  # not frozen: read on every request, and a frozen dataclass costs 4x to build
class OptimizerStatus:
    """What ``/readyz`` shows about the optimizer."""

    state: State
    optimizer: str
    detail: str = ""
    # hf: the measured speed of this device, and whether the deadline is below a typical rewrite (/readyz).
    speed: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.state in ("ready", "disabled")


@dataclass(frozen=True)
class OptimizerOptions:
    """Knobs shared by the backends; each backend reads the ones that apply to it."""

    # The cap on one rewrite's tokens; each rewrite's own budget is sized from its prompt (budget.token_budget).
    max_new_tokens: int = 1024
    max_batch_size: int = 0  # 0: by device (hf.default_batch_size)
    max_wait_ms: float = 5.0
    seed: int | None = None
    device: str | None = None
    remote_model: str | None = None
    # The deadline of one rewrite (--optimizer-timeout): remote/llm calls time out at it, and the hf backend
    # sheds a request at once when its queue cannot finish within it.
    request_timeout: float = 30.0
    api_key: str | None = None
    # A server (remote:) that cannot be reached is probed again and again while the gateway runs; a one-shot
    # command (bpo rewrite) gives up at the first failure instead.
    retry_unreachable: bool = True
    on_batch: Callable[[int], None] | None = field(default=None, compare=False)
    # hf: time generation at start-up, to warn when the deadline is too short and to shed load (busy). The
    # gateway turns it on; offline users (bpo rewrite, bpo eval) have no deadline to shed for.
    measure_speed: bool = False
    # Token usage of a paid backend's call (llm:), as (model, usage): the gateway charges it to the client key
    # of the request that caused it.
    on_usage: Callable[[str, Mapping[str, Any]], None] | None = field(default=None, compare=False)


@runtime_checkable
class Optimizer(Protocol):
    """Rewrites one prompt. Implementations must be safe to call concurrently from one event loop."""

    @property
    def identity(self) -> str:
        """``name@version``: the same model gives the same identity in every process."""
        ...

    def status(self) -> OptimizerStatus: ...

    async def start(self) -> None:
        """Begin serving; a slow load may continue in the background (``status`` says when ready)."""
        ...

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        """Return the rewrite of ``text``; raise ``OptimizerUnavailable`` or ``OptimizerError``."""
        ...

    async def close(self) -> None: ...


async def wait_until_settled(optimizer: Optimizer, poll: float = 0.05) -> OptimizerStatus:
    """The optimizer's status once it is no longer loading (ready, failed or disabled).

    The one wait for a load: callers bound it with ``asyncio.wait_for`` where a deadline applies.
    """
    while (status := optimizer.status()).state == "loading":
        await asyncio.sleep(poll)
    return status
