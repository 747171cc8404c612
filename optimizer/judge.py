"""The pairwise judge: its prompt, reading its verdict, both answer orders, the win/tie/loss tally and ΔWR.

The one home of the measure that both ``bpo eval`` (offline, training/evaluate.py) and the gateway's shadow
judge (online, proxy/shadow.py, summarized by ``bpo ab report``) report: the same prompt, the same parser and
the same rule for combining the two answer orders (``combine_orders``), so the two ΔWRs are one measure.
It lives in ``optimizer`` because the measure belongs to the optimizer, and both ``proxy`` and ``training``
may import from here (never from each other).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

JudgeVerdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss", "invalid"]

# Bump when the judge's wording changes: it is stored with every verdict.
JUDGE_PROMPT_VERSION = "1"

JUDGE_SYSTEM = "You are an impartial expert who judges the quality of AI assistants' answers."

_JUDGE_TASK = """Two AI assistants answered the same user request. Decide which answer serves the user better.
Weigh helpfulness, relevance, accuracy, depth, clarity and harmlessness. Do not let the order of the \
answers or their length alone sway you.

[REQUEST]
{question}
[/REQUEST]

[ANSWER A]
{answer_a}
[/ANSWER A]

[ANSWER B]
{answer_b}
[/ANSWER B]

Explain your comparison in a few sentences. Then write your verdict alone on the last line: [[A]] if \
answer A is better, [[B]] if answer B is better, [[C]] if they are equally good."""


def build_judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    task = _JUDGE_TASK.format(question=question.strip(), answer_a=answer_a.strip(), answer_b=answer_b.strip())
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": task}]


_MARKER = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.I)
_SINGLE = re.compile(r"\[\s*(a|b|c|tie)\s*\]", re.I)
_NAMED = re.compile(
    r"(?:verdict|winner|better\s+(?:answer|response)|choice)\s*(?:is|:)?\s*[*_\s]*"
    r"(?:answer|assistant|response)?\s*[(\"']?\s*([ab])\b", re.I)
_TIE = re.compile(r"\b(?:tie|draw|equally\s+good|both\s+(?:answers\s+)?are\s+equally)\b", re.I)
_LETTERS: dict[str, JudgeVerdict] = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}


def parse_verdict(text: str) -> JudgeVerdict | None:
    """The judge's verdict, read from its last line that carries one; None when there is none or it is
    ambiguous (two different verdicts on that line)."""
    for line in reversed([line for line in text.splitlines() if line.strip()]):
        for pattern in (_MARKER, _SINGLE):
            found = {_LETTERS[m.lower()] for m in pattern.findall(line)}
            if len(found) == 1:
                return found.pop()
            if len(found) > 1:
                return None
    tail = text[-400:]
    named = _NAMED.findall(tail)
    if named:
        return _LETTERS[named[-1].lower()]
    return "tie" if _TIE.search(tail) else None


def combine_orders(original_first: JudgeVerdict | None, optimized_first: JudgeVerdict | None) -> Outcome:
    """The optimized prompt's outcome from both orders: (A=original, B=optimized) then the swap.

    Each order scores +1 for the optimized prompt's answer, -1 for the original's, 0 for a tie; the sum
    decides. So a verdict that flips with the order (position bias) is a tie, and a win in one order
    with a tie in the other is a win.
    """
    if original_first is None or optimized_first is None:
        return "invalid"
    score = {"B": 1, "A": -1, "tie": 0}[original_first] + {"A": 1, "B": -1, "tie": 0}[optimized_first]
    return "win" if score > 0 else "loss" if score < 0 else "tie"


@dataclass(frozen=True)
class Tally:
    """Win/tie/loss of one prompt set; percentages are over the judged (valid) prompts."""

    name: str
    win: int = 0
    tie: int = 0
    loss: int = 0
    invalid: int = 0

    @property
    def judged(self) -> int:
        return self.win + self.tie + self.loss

    def percent(self, count: int) -> float:
        return 100.0 * count / self.judged if self.judged else 0.0

    @property
    def delta_wr(self) -> float:
        """ΔWR = win% - loss%, as in the paper's tables."""
        return self.percent(self.win) - self.percent(self.loss)


def tally(name: str, outcomes: Iterable[str]) -> Tally:
    counts = {"win": 0, "tie": 0, "loss": 0, "invalid": 0}
    for outcome in outcomes:
        counts[outcome] += 1
    return Tally(name, **counts)


def average_delta_wr(tallies: Iterable[Tally]) -> float:
    """The mean of the sets' ΔWR (each set weighs the same, as in the paper's average column)."""
    values = [t.delta_wr for t in tallies if t.judged]
    return sum(values) / len(values) if values else 0.0
