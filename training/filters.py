"""The rules that turn critic verdicts into training pairs: length bounds, leaked markers, lost spans,
and where the context passage goes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from optimizer.template import BANNED_STRINGS
from training.critic import protected_spans
from training.records import join_context

# Markers of the critic prompt and its answer format: a rewrite that contains one leaked the scaffolding.
PROTECTION_MARKERS = (*BANNED_STRINGS, "[/PROTECT]", "[/INSTRUCTION]", "[CONTEXT]", "[GOOD RESPONSE]",
                      "[BAD RESPONSE]", "[END]", "Optimized Instruction:", "Detailed Comparison Result")


@dataclass(frozen=True)
class FilterRules:
    """Bounds from the paper: drop when original/optimized > 2 or optimized/original > 6 (in words)."""

    max_shrink: float = 2.0
    max_growth: float = 6.0
    require_protected_spans: bool = True


def word_count(text: str) -> int:
    return len(text.split())


def length_ratio_violation(original: str, optimized: str, rules: FilterRules) -> str | None:
    before, after = max(word_count(original), 1), max(word_count(optimized), 1)
    if before / after > rules.max_shrink:
        return "too-short"
    if after / before > rules.max_growth:
        return "too-long"
    return None


def leaked_marker(text: str) -> str | None:
    lowered = text.lower()
    return next((marker for marker in PROTECTION_MARKERS if marker.lower() in lowered), None)


def rejection_reason(instruction: str, optimized: str, rules: FilterRules) -> str | None:
    """Why a critic's rewrite of ``instruction`` must not become a training pair, or None to keep it."""
    if leaked_marker(optimized):
        return "protection-marker"
    ratio = length_ratio_violation(instruction, optimized, rules)
    if ratio:
        return f"length-ratio-{ratio}"
    if rules.require_protected_spans and not all(span_kept(span, optimized) for span in protected_spans(instruction)):
        return "lost-protected-span"
    return None


def span_kept(span: str, rewrite: str) -> bool:
    """Code must come back exactly; a quoted passage must keep its words, while its quote marks and a
    trailing punctuation mark may move (``"sight."`` -> ``"sight".``)."""
    if span.startswith("`"):
        return span in rewrite
    inner = span[1:-1].strip().rstrip(".,;:!?").strip()
    return inner in rewrite


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
