"""How many of the BPO reference rewrites the fidelity guard accepts, and why it rejects the rest.

Usage: python bench/guard_acceptance.py ../shared/data/bpo/pairs.json [--show-rejects] [--field-pair final]

Each record's (``final_input`` -> ``final_output``) is the training pair of the published optimizer; with
``--field-pair optimized`` the pair is (instruction + context -> ``optimized_prompt``) instead. Also reads
JSONL files of ``prompt`` / ``optimized_prompt`` (the output of ``bpo data build``).

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
    report_adversarial()


if __name__ == "__main__":
    main()
