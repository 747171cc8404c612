"""The pair filters: the serving guard's rule table (nothing the guard rejects is trained on), the same
length bounds on the instruction alone, and the context's place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizer.guard import LEAK_MARKERS, check_rewrite
from training.filters import place_context, rejection_reason

JUNK_AND_FAITHFUL = [json.loads(line) for line in
                     (Path(__file__).parents[1] / "fixtures/guard/junk_and_faithful.jsonl").read_text().splitlines()]
LONG_REWRITE = "Explain recursion " + " ".join(f"aspect{i}" for i in range(70)) + "."


@pytest.mark.parametrize(("optimized", "reason"), [
    ("Explain recursion with an example.", None),
    ("[PROTECT] Explain recursion [/PROTECT] clearly.", "leaked-marker"),
    ("Explain recursion. [KEEP THIS]", "leaked-marker"),
    ("[instruction] Explain recursion simply.", "leaked-marker"),
    ("Explain recursion. Optimized Instruction: Explain recursion.", "leaked-marker"),
    ("Explain recursion.", None),  # exactly half as long is allowed
    ("Explain.", "length"),
    (LONG_REWRITE, "length"),  # past 6x and past the 64-word floor
    ("You're an expert prompt engineer. Please help me improve this prompt to explain recursion.", "template-echo"),
])
def test_rejection_reasons_are_guard_rule_names(optimized: str, reason: str | None) -> None:
    assert rejection_reason("Explain recursion to me.", optimized) == reason


@pytest.mark.parametrize("row", JUNK_AND_FAITHFUL, ids=lambda row: f"{row['rule']}:{row['rewrite'][:30]}")
def test_what_the_guard_rejects_is_never_trained_on(row: dict[str, str | None]) -> None:
    original, rewrite = str(row["original"]), str(row["rewrite"])
    assert rejection_reason(original, rewrite) == check_rewrite(original, rewrite).rule == row["rule"]


def test_spans_the_guard_keeps_are_kept_in_training_pairs() -> None:
    original = 'Translate "Guten Morgen" into English.'
    assert rejection_reason(original, "Translate the German greeting into English.") == "quoted"
    assert rejection_reason(original, 'Translate the German greeting "Guten Morgen" into English.') is None
    assert rejection_reason('Select the homophone for "sight."', 'Select the homophone for "sight".') is None
    assert rejection_reason("Fix `x=1`.", "Fix `x = 1` in the code.") == "inline-code"


def test_the_instruction_alone_keeps_the_length_bounds_under_a_long_context() -> None:
    instruction = "Summarize the following article in three sentences for a reader in a hurry."
    context = " ".join(f"Sentence {i} of the article says something new." for i in range(20))
    assert rejection_reason(instruction, "Summarize the article.", context) == "instruction-length"
    assert rejection_reason(instruction, "Summarize the article below in three short sentences.", context) is None


def test_one_marker_list_serves_the_guard_and_the_filters() -> None:
    for marker in LEAK_MARKERS:
        assert rejection_reason("Explain recursion to me.", f"Explain recursion to me. {marker}") == "leaked-marker"


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
