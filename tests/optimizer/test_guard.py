"""The fidelity guard's table: each rule accepts faithful rewrites and rejects the loss it exists for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizer.guard import RULES, GuardVerdict, check_rewrite
from optimizer.template import TEMPLATE

FENCE = "```"

# (original, rewrite, rule that must reject it or None when the rewrite must pass)
CASES = [
    # empty / markers
    ("Tell me a joke.", "   ", "empty"),
    ("Tell me a joke.", "Tell me a short, clean joke. [/INST]", "leaked-marker"),
    ("Tell me a joke.", "Tell me a joke [PROTECT] about cats.", "leaked-marker"),
    (
        "What does [INST] mean in Llama prompts?",
        "Explain what the [INST] tag means in Llama 2 prompts.",
        None,
    ),
    # length: 0.5x - 6x, with room for very short prompts to grow
    (
        "hello world",
        "Greet the user in a playful manner while acknowledging that the AI is not the world.",
        None,
    ),
    # (distinct words: 64 copies of one word would be a loop, rejected by the repetition rule first)
    ("What is rabies?", "Explain " + " ".join(f"point{i}" for i in range(63)), None),
    ("What is rabies?", "Explain " + " ".join(f"point{i}" for i in range(64)), "length"),
    (
        "Write a story about a dog who learns to fly over the mountains and meets a wise old eagle there.",
        "Write a story.",
        "length",
    ),
    ("Summarise " + "the long text " * 10, "Summarise " + "the long text " * 70, "length"),
    # numbers
    (
        "Give 3 examples of prime numbers above 100.",
        "List three examples of prime numbers greater than 100.",
        None,
    ),
    (
        "Give 3 examples of prime numbers above 100.",
        "List some examples of prime numbers greater than 100.",
        "number",
    ),
    ("The budget is 1,000 dollars.", "Plan a trip with a budget of 1000 dollars.", None),
    (
        "Compute 7.99 * 4 and 14.99 * 3.",
        "Compute 7.99 times 4 and 14.99 times three, showing each step.",
        None,
    ),
    ("Compute 7.99 * 4.", "Compute 8 times 4, showing each step.", "number"),
    ("Sort the list 1,2,3,10.", "Sort the list 1, 2, 3, 10 in ascending order.", None),
    # urls and e-mails
    (
        "Summarise https://example.com/a?b=1.",
        "Summarise the page at https://example.com/a?b=1 in 3 bullets.",
        None,
    ),
    ("Summarise https://example.com/a?b=1.", "Summarise the page at example.com in 3 bullets.", "url"),
    (
        "Write to Jane.Doe@example.org about the launch.",
        "Draft a polite e-mail to jane.doe@example.org.",
        None,
    ),
    (
        "Write to jane@example.org about the launch.",
        "Draft a polite e-mail to Jane about the launch.",
        "email",
    ),
    # code
    (
        f"Fix this:\n{FENCE}python\nx = 1\nif x = 1:\n    print(x)\n{FENCE}",
        f"Find and fix the syntax error in this Python code:\n"
        f"{FENCE}python\nx = 1\nif x = 1:  \n    print(x)\n{FENCE}",
        None,
    ),
    (
        f"Fix this:\n{FENCE}python\nx = 1\nif x = 1:\n    print(x)\n{FENCE}",
        f"Fix this Python code:\n{FENCE}python\nx = 1\nif x == 1:\n    print(x)\n{FENCE}",
        "code-block",
    ),
    (
        "What does `git rebase -i` do?",
        "Explain what the `git rebase -i` command does, with an example.",
        None,
    ),
    (
        "What does `git rebase -i` do?",
        "Explain what interactive git rebase does, with an example.",
        "inline-code",
    ),
    # quoted spans
    (
        'Translate "Yesterday evening I went to the store" into Spanish.',
        "Translate the sentence “Yesterday evening I went to the store” into Spanish.",
        None,
    ),
    (
        'Select the correct homophone for "sight."',
        'Select the correct homophone for "sight" and explain.',
        None,
    ),
    (
        'Arrange these words into a sentence: "like/to/she/barbecue/does"',
        'Arrange these words into a sentence: "like/to/she/barbecue".',
        "quoted",
    ),
    # placeholders
    (
        "Write a greeting for {name} at {company}.",
        "Write a warm greeting for {name} who works at { company }.",
        None,
    ),
    ("Write a greeting for {name} at {company}.", "Write a warm greeting for the new hire.", "placeholder"),
    (
        "Fill in <customer> and {0} in the template.",
        "Complete the template, filling <customer> and {0}.",
        None,
    ),
    ("Fill in <customer> in the template.", "Complete the template for the customer.", "placeholder"),
    # passages: the material after the instruction reaches the target unchanged
    (
        "Summarise this note.\nI am sorry but I will not be able to meet you for lunch on Friday "
        "because I must finish a project by the afternoon and cannot be sure I will be done.",
        "Summarise the following note in one sentence, keeping its apology.\n"
        "I am sorry but I will not be able to meet you for lunch on Friday because I must finish a project "
        "by the afternoon and cannot be sure "
        "I will be done.",
        None,
    ),
    (
        "Summarise this note.\nI am sorry but I will not be able to meet you for lunch on Friday "
        "because I must finish a project by the afternoon and cannot be sure I will be done.",
        "Summarise this note in one sentence.\nI am sorry but I cannot meet you for lunch on Friday "
        "because I must finish a project by the afternoon and cannot be sure I will be done.",
        "passage",
    ),
]


@pytest.mark.parametrize(("original", "rewrite", "rejected_by"), CASES)
def test_guard_table(original: str, rewrite: str, rejected_by: str | None) -> None:
    verdict = check_rewrite(original, rewrite)
    assert verdict.rule == rejected_by, verdict.detail
    assert verdict.accepted is (rejected_by is None)


def test_relabelled_passage_with_other_quotes_is_kept() -> None:
    original = (
        'Rate this memory from 1 to 10.\nMemory: Tommie said "I really enjoy design and improving things '
        'visually, it is just something that comes naturally to me, what about you?"'
    )
    rewrite = (
        "On a scale of 1 to 10, rate the following memory: \"Tommie said 'I really enjoy design and "
        "improving things visually, it is just something that comes naturally to me, what about you?'\""
    )
    assert check_rewrite(original, rewrite).accepted


def test_rejection_names_what_went_missing() -> None:
    verdict = check_rewrite("Email bob@example.com the 42 files.", "Email Bob the files.")
    assert verdict == GuardVerdict(False, "email", "e-mail 'bob@example.com' is missing")


def test_identical_rewrite_passes_every_rule() -> None:
    original = (
        f'Call {{name}} at <phone> about "the offer", see https://x.io/p and `make test`:\n'
        f"{FENCE}\nmake test\n{FENCE}\nIt costs 1,299.50 dollars; write to a@b.co."
    )
    assert check_rewrite(original, original).accepted


def test_rules_are_a_documented_table() -> None:
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    assert {"length", "number", "url", "email", "code-block", "inline-code", "quoted", "placeholder"} <= set(
        names
    )
    assert all(rule.keeps for rule in RULES)


# Runs that once made a rule re-scan the same characters from every start (quadratic time on the event
# loop). No timer here: bench/guard_acceptance.py times them; this checks the verdicts stay right.
ADVERSARIAL = ["a." * 4000, "a@" * 4000, "1." * 4000, "-1" * 4000, "{" * 8000, "`" * 8000, '"' * 8000,
               "“" * 8000, "«" * 8000, "```" + "1," * 4000]


@pytest.mark.parametrize("noise", ADVERSARIAL, ids=lambda noise: repr(noise[:4]))
def test_adversarial_prompt_is_judged_like_any_other(noise: str) -> None:
    original = noise + " Then mail the result to bob@example.org."
    assert check_rewrite(original, original).accepted
    verdict = check_rewrite(original, "Then mail the result to Bob.")
    assert verdict == GuardVerdict(False, "email", "e-mail 'bob@example.org' is missing")


def test_address_behind_leading_punctuation_is_kept() -> None:
    verdict = check_rewrite("Write to --bob@x.org and .jane@y.org now.", "Write to bob@x.org now.")
    assert verdict == GuardVerdict(False, "email", "e-mail 'jane@y.org' is missing")


def test_one_line_fence_is_code_not_an_info_string() -> None:
    original = f"Fix {FENCE}x = 1 +{FENCE} please."
    assert check_rewrite(original, f"Fix this code please: {FENCE}x = 1 +{FENCE}").accepted
    verdict = check_rewrite(original, "Fix the broken addition please.")
    assert verdict == GuardVerdict(False, "code-block", "code block 'x = 1 +' is missing")


# Junk a real optimizer wrote (the template echoed, an answer, a loop, another topic) next to faithful
# rewrites of the same prompts: each junk row names the rule that must catch it, each faithful row passes.
JUNK_AND_FAITHFUL = [json.loads(line) for line in
                     (Path(__file__).parents[1] / "fixtures/guard/junk_and_faithful.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", JUNK_AND_FAITHFUL, ids=lambda row: f"{row['rule']}:{row['rewrite'][:30]}")
def test_junk_is_rejected_by_its_rule_and_faithful_rewrites_pass(row: dict[str, str | None]) -> None:
    verdict = check_rewrite(str(row["original"]), str(row["rewrite"]))
    assert verdict.rule == row["rule"], verdict.detail


def test_template_echo_is_caught_however_the_template_is_spelled() -> None:
    echo = TEMPLATE.format(prompt="Tell me about Rome.").replace("[INST] ", "").replace(" [/INST]", "")
    assert check_rewrite("Tell me about Rome.", echo).rule == "template-echo"
    # a prompt about prompt engineering may say so: the runs it shares with the original do not count
    original = "You are an expert prompt engineer. Please help me improve this prompt: 'list fruits'."
    assert check_rewrite(original, original + " Explain each change.").accepted


def test_topic_rule_leaves_prompts_too_short_to_judge_alone() -> None:
    assert check_rewrite("Hi there!", "Greet the user and offer help with any question.").accepted


def test_answer_rule_explains_itself() -> None:
    verdict = check_rewrite("List three fruits.", "Here are three fruits: apple, pear and plum.")
    assert verdict == GuardVerdict(False, "answer", "it opens like a reply ('Here are'), not a request")
