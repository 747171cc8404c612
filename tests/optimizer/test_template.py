"""The pure pieces of decoding: output cleaning (template.py), token budgets and minimum length (budget.py)."""

from __future__ import annotations

import pytest

from optimizer.budget import MIN_BUDGET_TOKENS, estimate_tokens, min_new_tokens, token_budget
from optimizer.template import clean_output


@pytest.mark.parametrize(("generated", "expected"), [
    # The reference cuts at the first marker wherever it is, not only at the end of the line.
    ("Write a poem about cats [KEEP the rhyme] in four lines", "Write a poem about cats"),
    ("Explain [INSTRUCTION] recursion", "Explain"),
    ("List the planets [PROTECT]", "List the planets"),
    ("Explain black holes clearly [KEE", "Explain black holes clearly"),
    (" Explain gravity.\nSecond line [KEEP]", "Explain gravity."),
    ("Use [brackets] freely", "Use [brackets] freely"),
])
def test_aggressive_cleanup_cuts_at_the_first_marker(generated: str, expected: str) -> None:
    assert clean_output(generated, "aggressive") == expected


def test_stable_cleanup_only_trims() -> None:
    assert clean_output("  Line one [KEEP x]\nline two \n", "stable") == "Line one [KEEP x]\nline two"


def test_budget_is_six_times_the_prompt_with_a_floor_and_a_cap() -> None:
    assert token_budget(3, 1024) == MIN_BUDGET_TOKENS
    assert token_budget(100, 1024) == 600
    assert token_budget(400, 1024) == 1024
    assert token_budget(100, 256) == 256


def test_aggressive_minimum_is_prompt_plus_five_and_stable_has_none() -> None:
    assert min_new_tokens(12, "aggressive") == 17
    assert min_new_tokens(12, "stable") is None
    # A minimum always fits the budget of its own prompt, unless the cap is lower.
    assert all(min_new_tokens(n, "aggressive") < token_budget(n, 4096) for n in range(1, 800))  # type: ignore[operator]


def test_estimate_counts_words_and_bos() -> None:
    assert estimate_tokens("one two three") == 5
