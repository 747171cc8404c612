"""Offline metrics of a set of rewrites, no API needed: length ratio, copy rate, guard pass rate and
similarity to reference rewrites."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def words(text: str) -> list[str]:
    return text.lower().split()


def is_copy(original: str, rewrite: str) -> bool:
    """The optimizer gave the prompt back (ignoring case and spacing)."""
    return words(original) == words(rewrite)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: longest common subsequence, a standard rewrite similarity."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def guard_accepts(original: str, rewrite: str) -> bool:
    """Whether the proxy's fidelity guard would let this rewrite through."""
    from optimizer.guard import check_rewrite

    return bool(check_rewrite(original, rewrite).accepted)


@dataclass(frozen=True)
class RewriteMetrics:
    count: int
    length_ratio: float
    copy_rate: float
    guard_pass_rate: float
    reference_similarity: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"count": self.count, "length_ratio": self.length_ratio, "copy_rate": self.copy_rate,
                "guard_pass_rate": self.guard_pass_rate, "reference_similarity": self.reference_similarity}


def rewrite_metrics(originals: Sequence[str], rewrites: Sequence[str],
                    references: Sequence[str | None] | None = None) -> RewriteMetrics:
    """Median word-length ratio, copy and guard-pass rates (0-1), mean ROUGE-L to references where given."""
    if not originals:
        return RewriteMetrics(0, 0.0, 0.0, 0.0, None)
    ratios = [len(words(r)) / max(len(words(o)), 1) for o, r in zip(originals, rewrites, strict=True)]
    copies = sum(is_copy(o, r) for o, r in zip(originals, rewrites, strict=True))
    passed = sum(guard_accepts(o, r) for o, r in zip(originals, rewrites, strict=True))
    scored = [rouge_l(r, ref) for r, ref in zip(rewrites, references or [], strict=False) if ref]
    return RewriteMetrics(len(originals), statistics.median(ratios), copies / len(originals),
                          passed / len(originals), statistics.fmean(scored) if scored else None)
