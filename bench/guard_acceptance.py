"""How many of the BPO reference rewrites the fidelity guard accepts, and why it rejects the rest.

Usage: python bench/guard_acceptance.py ../shared/data/bpo/pairs.json [--show-rejects] [--field-pair final]

Each record's (``final_input`` -> ``final_output``) is the training pair of the published optimizer; with
``--field-pair optimized`` the pair is (instruction + context -> ``optimized_prompt``) instead. Also reads
JSONL files of ``prompt`` / ``optimized_prompt`` (the output of ``bpo data build``).

Then the junk classes a real optimizer emits, built from the same records: the template echoed, the
answer instead of a prompt (the record's good response, cut to a length the length rule allows), a loop
(the reference's opening words over and over) and an unrelated instruction (another record's reference).
The guard should reject nearly all of them while accepting nearly all references.

It then times the guard on adversarial prompts (long runs that once made a rule backtrack) at 8,000 and
32,000 characters: linear rules take about 4x as long on 4x the text, a quadratic one about 16x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.guard import RULES, check_rewrite


def load_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pair_of(record: dict[str, Any], field_pair: str) -> tuple[str, str]:
    if "prompt" in record and "optimized_prompt" in record and "instruction" not in record:
        return str(record["prompt"]), str(record["optimized_prompt"])
    if field_pair == "optimized":
        context = record.get("context") or ""
        original = record["instruction"] + ("\n" + context if context else "")
        return original, str(record["optimized_prompt"])
    return str(record["final_input"]), str(record["final_output"])


# What an echoing optimizer writes: its own instruction, alone or around the prompt.
ECHO_OPENING = ("You're an expert prompt engineer. Please help me improve this prompt to get a more helpful "
                "and harmless response")


def junk_rewrites(records: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    """(original, junk rewrite) pairs per junk class, from (original, reference, answer) triples."""
    classes: dict[str, list[tuple[str, str]]] = {"template-echo": [], "answer": [], "repetition": [],
                                                  "unrelated": []}
    for index, (original, reference, answer) in enumerate(records):
        echoes = (ECHO_OPENING + ":\n" + original, ECHO_OPENING + ".",
                  "You are an expert prompt engineer. " + reference)
        classes["template-echo"].append((original, echoes[index % 3]))
        budget = max(8, min(3 * len(original.split()), 64))
        if answer.strip():
            classes["answer"].append((original, " ".join(answer.split()[:budget])))
        opening = " ".join(reference.split()[:8])
        loops = max(3, budget // max(len(opening.split()), 1))
        classes["repetition"].append((original, " ".join([opening] * loops)))
        classes["unrelated"].append((original, records[(index + len(records) // 2) % len(records)][1]))
    return classes


def report_junk(records: list[dict[str, Any]], field_pair: str) -> None:
    triples = [(*pair_of(record, field_pair), str(record.get("good_res") or "")) for record in records]
    print("guard rejected junk rewrites built from the same records:")
    for name, pairs in junk_rewrites(triples).items():
        rules: Counter[str] = Counter()
        for original, rewrite in pairs:
            verdict = check_rewrite(original, rewrite)
            if not verdict.accepted:
                rules[verdict.rule or "?"] += 1
        rejected = sum(rules.values())
        by_rule = ", ".join(f"{rule} {count}" for rule, count in rules.most_common())
        print(f"  {name:<14} {rejected:>3}/{len(pairs)} ({100 * rejected / max(len(pairs), 1):5.1f}%)  {by_rule}")


# (opening, unit): the unit repeats after the opening to the length under test; the guard runs on the
# prompt and its identical rewrite, so every rule scans all of it.
ADVERSARIAL_PROMPTS = (
    ("", "a."), ("", "a@"), ("", "1."), ("", "-1"), ("", "{"), ("", "`"), ("", '"'), ("", "“"), ("", "«"),
    ("```", "1,"),
)
ADVERSARIAL_SIZES = (8_000, 32_000)


def adversarial_prompt(opening: str, unit: str, size: int) -> str:
    return opening + (unit * (size // len(unit) + 1))[: size - len(opening) - 1] + "x"


def time_guard(text: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        check_rewrite(text, text)
        best = min(best, time.perf_counter() - started)
    return best


def report_adversarial() -> None:
    small, large = ADVERSARIAL_SIZES
    print(f"guard time on adversarial prompts ({small:,} vs {large:,} chars; ~{large // small}x = linear):")
    for opening, unit in ADVERSARIAL_PROMPTS:
        seconds = [time_guard(adversarial_prompt(opening, unit, size)) for size in ADVERSARIAL_SIZES]
        ratio = seconds[1] / max(seconds[0], 1e-9)
        shown = f"{opening!r} + {unit!r} x N"
        print(f"  {shown:>24}  {1000 * seconds[0]:7.2f} ms  {1000 * seconds[1]:8.2f} ms  ratio {ratio:4.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="pairs.json (BPO release) or a pairs JSONL file")
    parser.add_argument("--field-pair", choices=("final", "optimized"), default="final",
                        help="which fields form the (original, rewrite) pair in BPO release records")
    parser.add_argument("--show-rejects", action="store_true", help="print every rejected pair")
    args = parser.parse_args()

    records = load_records(args.pairs)
    reasons: Counter[str] = Counter()
    for record in records:
        original, rewrite = pair_of(record, args.field_pair)
        verdict = check_rewrite(original, rewrite)
        if verdict.accepted:
            continue
        reasons[verdict.rule or "?"] += 1
        if args.show_rejects:
            print(f"--- {verdict.rule}: {verdict.detail}")
            print(f"    original: {original[:300]!r}")
            print(f"    rewrite:  {rewrite[:300]!r}")
    accepted = len(records) - sum(reasons.values())
    share = 100 * accepted / len(records)
    print(f"guard accepted {accepted}/{len(records)} reference rewrites ({share:.1f}%)")
    for rule in RULES:
        if reasons[rule.name]:
            print(f"  rejected by {rule.name:<13} {reasons[rule.name]:>3}  (keeps {rule.keeps})")
    report_junk(records, args.field_pair)
    report_adversarial()


if __name__ == "__main__":
    main()
