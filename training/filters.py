"""Which critic rewrites become training pairs: the serving guard's own rule table, so the optimizer is never
trained on a rewrite the gateway would refuse to forward, plus what only training needs; and where the context
passage goes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from optimizer.guard import RULES_BY_NAME, check_rewrite
from training.records import join_context

# Training only: the critic rewrote the instruction alone, so the guard's length bounds also hold for the
# instruction without its context (a long context on both sides would hide a rewrite that dropped half the
# instruction). The same rule, the same bounds.
INSTRUCTION_LENGTH = "instruction-length"


def rejection_reason(instruction: str, optimized_instruction: str, context: str = "") -> str | None:
    """Why a critic's rewrite of ``instruction`` must not become a training pair, or None to keep it.

    The reason is the name of the first guard rule the pair fails, checked as the optimizer would see and
    write it (the context placed on both sides), else ``instruction-length``.
    """
    prompt, optimized = place_context(instruction, context, optimized_instruction)
    verdict = check_rewrite(prompt, optimized)
    if not verdict.accepted:
        return verdict.rule
    if RULES_BY_NAME["length"].check(instruction, optimized_instruction) is not None:
        return INSTRUCTION_LENGTH
    return None


def place_context(instruction: str, context: str, optimized: str) -> tuple[str, str]:
    """The (prompt, optimized prompt) pair: the context follows the instruction the same way on both sides.

    A critic that already quoted the whole context inside its rewrite gets it only once.
    """
    prompt = join_context(instruction, context)
    if context.strip() and " ".join(context.split()) in " ".join(optimized.split()):
        return prompt, optimized.strip()
    return prompt, join_context(optimized, context)


@dataclass
class FilterStats:
    """What happened to each input record, printed at the end of ``bpo data build``."""

    total: int = 0
    duplicates: int = 0
    resumed: int = 0
    kept: int = 0
    errors: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {"total": self.total, "duplicates": self.duplicates, "resumed": self.resumed,
                "kept": self.kept, "errors": self.errors, "dropped": dict(self.dropped)}
