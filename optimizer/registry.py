"""Build an optimizer from its spec string (``none``, ``hf:``, ``remote:``, ``llm:``)."""

from __future__ import annotations

from optimizer.base import Mode, Optimizer, OptimizerOptions, OptimizerStatus, OptimizerUnavailable, Rewrite


class SpecError(ValueError):
    """The optimizer spec names no known backend."""


class NoOptimizer:
    """``--optimizer none``: the proxy forwards prompts unchanged."""

    identity = "none@0"

    def status(self) -> OptimizerStatus:
        return OptimizerStatus("disabled", self.identity, "optimizer is none")

    async def start(self) -> None:
        return None

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        raise OptimizerUnavailable("no optimizer configured")

    async def close(self) -> None:
        return None


def build_optimizer(spec: str, options: OptimizerOptions) -> Optimizer:
    kind, _, target = spec.partition(":")
    if spec == "none":
        return NoOptimizer()
    if kind == "remote" and target:
        from optimizer.remote import RemoteOptimizer

        return RemoteOptimizer(target, options)
    if kind == "hf" and target:
        from optimizer.hf import HFOptimizer

        return HFOptimizer(target, options)
    if kind == "llm" and target:
        from optimizer.llm import LLMOptimizer

        return LLMOptimizer(target, options)
    raise SpecError(f"unknown optimizer spec {spec!r}: use none, hf:PATH, remote:URL or llm:MODEL")
