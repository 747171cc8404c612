"""The critic prompt carries the record, and its answers parse (or fail) the way the filters expect."""

from __future__ import annotations

import pytest

from training.critic import CriticParseError, build_critic_messages, parse_critic_output, protected_spans

RECORD = {"instruction": "Summarize the text in one sentence.", "context": "The cat sat on the mat all day.",
          "good_res": "A cat spent the whole day sitting on a mat.", "bad_res": "Cats.", "source": "x"}


def test_critic_prompt_contains_every_field_of_the_record() -> None:
    system, user = build_critic_messages(RECORD)
    assert system["role"] == "system" and user["role"] == "user"
    for key in ("instruction", "context", "good_res", "bad_res"):
        assert RECORD[key] in user["content"]
    assert "Optimized Instruction:" in user["content"] and "[END]" in user["content"]
    assert "attached to it again unchanged" in user["content"]


def test_critic_prompt_without_context_has_no_context_block_and_lists_protected_spans() -> None:
    record = {"instruction": 'Translate "Guten Morgen" and run `ls -la`.', "good_res": "g", "bad_res": "b"}
    user = build_critic_messages(record)[1]["content"]
    assert "[CONTEXT]" not in user and "attached to it again" not in user
    assert '[PROTECT] "Guten Morgen" [/PROTECT]' in user and "[PROTECT] `ls -la` [/PROTECT]" in user


def test_protected_spans_finds_code_quotes_and_skips_nested_ones() -> None:
    text = 'Fix ```print("hi")``` and explain “this” and "that".'
    assert protected_spans(text) == ['```print("hi")```', '"that"', "“this”"]


@pytest.mark.parametrize(("text", "instruction", "comparison"), [
    ("Detailed Comparison Result: A is vague.\nOptimized Instruction: Explain X in detail. [END]",
     "Explain X in detail.", "A is vague."),
    ("**Detailed Comparison Result:** bad misses facts\n\n**Optimized Instruction:** Explain X. [END]",
     "Explain X.", "bad misses facts"),
    ('Detailed Comparison Result: ok\nOptimized Instruction: "Explain X clearly." [END]\n', "Explain X clearly.", "ok"),
    ("Optimized Instruction: Explain X.\nAlso mention Y. [end]", "Explain X.\nAlso mention Y.", ""),
    ("Detailed comparison result: the optimized instruction: was vague.\nOptimised instruction: Do Z. [END] trailing",
     "Do Z.", "the optimized instruction: was vague."),
    ('Optimized Instruction: Say "hi" to "Bob". [END]', 'Say "hi" to "Bob".', ""),
])
def test_well_formed_critic_outputs_parse(text: str, instruction: str, comparison: str) -> None:
    verdict = parse_critic_output(text)
    assert verdict.optimized_instruction == instruction
    assert verdict.comparison == comparison


@pytest.mark.parametrize(("text", "finish_reason", "reason"), [
    ("Detailed Comparison Result: the good one is better.", "stop", "no-optimized-instruction"),
    ("", "stop", "no-optimized-instruction"),
    ("Detailed Comparison Result: x\nOptimized Instruction: Explain X in det", "stop", "truncated"),
    ("Detailed Comparison Result: x\nOptimized Instruction: Explain X. [END]", "length", "truncated"),
    ("Detailed Comparison Result: x\nOptimized Instruction: ** [END]", "stop", "empty"),
    ("Optimized Instruction: [END] Optimized Instruction: still writing", None, "truncated"),
])
def test_malformed_and_truncated_critic_outputs_are_rejected_with_a_reason(
        text: str, finish_reason: str | None, reason: str) -> None:
    with pytest.raises(CriticParseError) as caught:
        parse_critic_output(text, finish_reason)
    assert caught.value.reason == reason
