"""The pair filters: the paper's length bounds, leaked markers, lost spans and the context's place."""

from __future__ import annotations

import pytest

from training.filters import FilterRules, length_ratio_violation, place_context, rejection_reason

RULES = FilterRules()


@pytest.mark.parametrize(("original", "optimized", "expected"), [
    ("one two three four", "one two", None),  # exactly 2x shorter is allowed
    ("one two three four five", "one two", "too-short"),  # 2.5x shorter
    ("one", "a b c d e f", None),  # exactly 6x longer is allowed
    ("one", "a b c d e f g", "too-long"),
    ("", "a", None),  # empty counts as one word, never divides by zero
])
def test_length_ratio_bounds(original: str, optimized: str, expected: str | None) -> None:
    assert length_ratio_violation(original, optimized, RULES) == expected


@pytest.mark.parametrize(("optimized", "reason"), [
    ("Explain recursion with an example.", None),
    ("[PROTECT] Explain recursion [/PROTECT] clearly.", "protection-marker"),
    ("Explain recursion. [KEEP THIS]", "protection-marker"),
    ("[instruction] Explain recursion simply.", "protection-marker"),
    ("Explain recursion in detail, for a beginner, with two examples, a diagram, a summary table, "
     "common mistakes, history, exercises and a quiz at the end.", "length-ratio-too-long"),
])
def test_rejection_reasons(optimized: str, reason: str | None) -> None:
    assert rejection_reason("Explain recursion to me.", optimized, RULES) == reason


def test_a_rewrite_that_drops_a_quoted_span_is_rejected() -> None:
    original = 'Translate "Guten Morgen" into English.'
    assert rejection_reason(original, "Translate the German greeting into English.", RULES) == "lost-protected-span"
    assert rejection_reason(original, 'Translate the German greeting "Guten Morgen" into English.', RULES) is None
    assert rejection_reason('Select the homophone for "sight."', 'Select the homophone for "sight".', RULES) is None
    assert rejection_reason('Fix `x=1`.', "Fix `x = 1` in the code.", RULES) == "lost-protected-span"
    loose = FilterRules(require_protected_spans=False)
    assert rejection_reason(original, "Translate the German greeting into English.", loose) is None


def test_context_follows_the_instruction_on_both_sides() -> None:
    prompt, optimized = place_context("Summarize this.", "  The cat sat.\n", "Summarize this in one line.")
    assert prompt == "Summarize this.\nThe cat sat."
    assert optimized == "Summarize this in one line.\nThe cat sat."


def test_context_quoted_by_the_critic_is_not_appended_twice() -> None:
    _, optimized = place_context("Convert the date.", "November 25, 2020",
                                 'Convert the date "November 25, 2020" to ISO 8601.')
    assert optimized == 'Convert the date "November 25, 2020" to ISO 8601.'


def test_without_context_the_pair_is_the_instructions() -> None:
    assert place_context(" Hi. ", "", "Say hello politely.") == ("Hi.", "Say hello politely.")
