"""Running an optimizer from the training tools: build it from its spec, wait until it is ready, and
rewrite a prompt one or more rounds (iterative BPO feeds each rewrite back in)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from training.errors import ConfigError

if TYPE_CHECKING:
    from optimizer.base import Mode, Optimizer


async def start_optimizer(spec: str, seed: int | None = None, max_new_tokens: int = 256,
                          timeout: float = 600.0) -> Optimizer:
    """The optimizer named by ``spec`` (``hf:DIR``, ``remote:URL``, ``llm:MODEL``), loaded and ready."""
    from optimizer.base import OptimizerOptions, wait_until_settled
    from optimizer.registry import SpecError, build_optimizer

    try:
        optimizer = build_optimizer(spec, OptimizerOptions(seed=seed, max_new_tokens=max_new_tokens))
    except SpecError as exc:
        raise ConfigError(str(exc)) from exc
    await optimizer.start()
    try:
        status = await asyncio.wait_for(wait_until_settled(optimizer), timeout)
    except TimeoutError:
        raise ConfigError(f"optimizer {spec} still loading after {timeout:.0f}s") from None
    if status.state != "ready":
        await optimizer.close()
        raise ConfigError(f"optimizer {spec} is {status.state}: {status.detail}")
    return optimizer


async def optimize_rounds(optimizer: Optimizer, text: str, mode: Mode, rounds: int) -> list[str]:
    """Each round's rewrite: round k optimizes the output of round k-1."""
    outputs: list[str] = []
    current = text
    for _ in range(rounds):
        current = (await optimizer.optimize(current, mode)).text
        outputs.append(current)
    return outputs
