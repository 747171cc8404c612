"""How good are an optimizer's rewrites of held-out prompts, as the gateway would forward them?

Usage: python bench/rewrite_quality.py PAIRS [--optimizer SPEC ...] [--limit 24] [--mode stable]
                                      [--seed 42] [--output results.json]

PAIRS: JSON/JSONL of ``prompt`` / ``optimized_prompt`` (``bpo train`` writes the pairs it held out to
``OUTPUT/held_out.jsonl``) or the BPO release's ``final_input`` / ``final_output``. Each ``--optimizer`` (the
default: ``none``, the identity baseline that forwards every prompt unchanged) rewrites every prompt, one at a
time, through the gateway's own pipeline (optimizer, truncation check, fidelity guard, fail open), with no
cache and no deadline. Per optimizer it reports:

- applied: the share of prompts forwarded rewritten; the rest by reason (guard rule, truncated, unchanged, error)
- truncated and echo: the share of raw rewrites that stopped on the token budget / echoed the template, and how
  many of either were forwarded (must be 0)
- length: the median words of the raw rewrite / the original
- ROUGE-L F1 to the reference rewrite, of the text forwarded (rejected rewrites fail open to the original)
  and of the raw rewrites
- seconds per rewrite (mean and the slowest)

The same script runs on any spec and device: ``hf:`` picks the GPU when there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.base import Mode, Optimizer, OptimizerOptions, OptimizerStatus, Rewrite
from optimizer.cache import NullCache
from optimizer.guard import check_rewrite
from optimizer.junk import check_template_echo
from optimizer.pipeline import RewritePipeline
from optimizer.registry import build_optimizer
from training.metrics import rouge_l, words
from training.records import read_records
from training.sft import as_pair


class Identity:
    """The baseline: every prompt comes back as it is (so it is forwarded unchanged)."""

    identity = "identity@0"

    def status(self) -> OptimizerStatus:
        return OptimizerStatus("ready", self.identity)

    async def start(self) -> None:
        return None

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        return Rewrite(text, self.identity)

    async def close(self) -> None:
        return None


class Recording:
    """Wraps an optimizer and keeps its last raw rewrite and how long it took (the pipeline keeps neither)."""

    def __init__(self, inner: Optimizer) -> None:
        self.inner = inner
        self.last: Rewrite | None = None
        self.seconds = 0.0

    @property
    def identity(self) -> str:
        return self.inner.identity

    def status(self) -> OptimizerStatus:
        return self.inner.status()

    async def start(self) -> None:
        await self.inner.start()

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        self.last, started = None, time.perf_counter()
        try:
            self.last = await self.inner.optimize(text, mode)
            return self.last
        finally:
            self.seconds = time.perf_counter() - started

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Report:
    spec: str
    identity: str = ""
    count: int = 0
    applied: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    truncated_forwarded: int = 0
    echoed: int = 0
    echo_forwarded: int = 0
    length_ratios: list[float] = field(default_factory=list)
    rouge_forwarded: list[float] = field(default_factory=list)
    rouge_raw: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        share = 1 / max(self.count, 1)
        return {
            "spec": self.spec, "identity": self.identity, "count": self.count,
            "applied_rate": self.applied * share, "not_applied": dict(self.reasons.most_common()),
            "truncated_rate": self.truncated * share, "truncated_forwarded": self.truncated_forwarded,
            "echo_rate": self.echoed * share, "echo_forwarded": self.echo_forwarded,
            "length_ratio_median": statistics.median(self.length_ratios) if self.length_ratios else None,
            "rouge_l_forwarded": statistics.fmean(self.rouge_forwarded) if self.rouge_forwarded else None,
            "rouge_l_raw": statistics.fmean(self.rouge_raw) if self.rouge_raw else None,
            "seconds_mean": statistics.fmean(self.seconds) if self.seconds else None,
            "seconds_max": max(self.seconds, default=None),
        }


def load_pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    pairs = [pair for record in read_records(path) if (pair := as_pair(record)) is not None]
    return [(str(p["prompt"]), str(p["optimized_prompt"])) for p in pairs][:limit]


async def settled(optimizer: Optimizer) -> OptimizerStatus:
    while optimizer.status().state == "loading":
        await asyncio.sleep(0.1)
    return optimizer.status()


async def measure(spec: str, pairs: list[tuple[str, str]], mode: Mode, options: OptimizerOptions) -> Report:
    recording = Recording(Identity() if spec == "none" else build_optimizer(spec, options))
    # No cache, no deadline: every prompt costs one optimizer call, however slow the device.
    pipeline = RewritePipeline(recording, NullCache(), timeout=3600.0, max_chars=1_000_000)
    report = Report(spec)
    await recording.start()
    try:
        status = await settled(recording)
        if status.state != "ready":
            raise SystemExit(f"{spec}: optimizer is {status.state}: {status.detail}")
        report.identity = recording.identity
        for number, (original, reference) in enumerate(pairs, start=1):
            outcome = await pipeline.run(original, mode)
            record(report, original, reference, outcome.text, outcome.applied, outcome.reason, recording)
            print(f"{spec}: {number}/{len(pairs)} {outcome.reason or 'applied'} in {recording.seconds:.1f} s",
                  file=sys.stderr, flush=True)
    finally:
        await recording.close()
    return report


def record(report: Report, original: str, reference: str, forwarded: str, applied: bool, reason: str | None,
           recording: Recording) -> None:
    raw = recording.last.text.strip() if recording.last is not None else ""
    truncated = recording.last is not None and recording.last.truncated
    echoed = bool(raw) and check_template_echo(original, raw) is not None
    report.count += 1
    report.applied += applied
    if not applied:
        rule = check_rewrite(original, raw).rule if reason == "guard-rejected" else None
        report.reasons[f"guard:{rule}" if rule else str(reason)] += 1
    report.truncated += truncated
    report.truncated_forwarded += truncated and applied
    report.echoed += echoed
    report.echo_forwarded += echoed and applied
    report.length_ratios.append(len(words(raw or original)) / max(len(words(original)), 1))
    report.rouge_forwarded.append(rouge_l(forwarded, reference))
    report.rouge_raw.append(rouge_l(raw or original, reference))
    report.seconds.append(recording.seconds)
    report.samples.append({"original": original, "rewrite": raw, "applied": applied, "reason": reason,
                           "truncated": truncated, "seconds": round(recording.seconds, 3)})


def print_table(reports: list[Report]) -> None:
    print(f"{'optimizer':<34} {'applied':>7} {'trunc':>6} {'echo':>5} {'len x':>6} {'ROUGE-L fwd':>11} "
          f"{'raw':>5} {'s/rewrite':>9}  not applied")
    for report in reports:
        s = report.summary()
        reasons = ", ".join(f"{reason} {count}" for reason, count in s["not_applied"].items())
        print(f"{report.spec[-34:]:<34} {s['applied_rate']:7.0%} {s['truncated_rate']:6.0%} {s['echo_rate']:5.0%} "
              f"{s['length_ratio_median']:6.2f} {s['rouge_l_forwarded']:11.3f} {s['rouge_l_raw']:5.3f} "
              f"{s['seconds_mean']:9.2f}  {reasons}")
        print(f"{'':<34} forwarded: {s['truncated_forwarded']} truncated, {s['echo_forwarded']} template echoes; "
              f"n={s['count']}, slowest {s['seconds_max']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="held-out pairs: prompt/optimized_prompt or final_input/final_output")
    parser.add_argument("--optimizer", action="append", metavar="SPEC",
                        help="none (identity baseline), hf:DIR_OR_GGUF, remote:URL, llm:MODEL; repeat to compare")
    parser.add_argument("--limit", type=int, default=24, help="the first N pairs (default 24)")
    parser.add_argument("--mode", choices=("stable", "aggressive"), default="stable", help="decoding mode")
    parser.add_argument("--seed", type=int, default=42, help="optimizer sampling seed (per prompt, as served)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="token cap (default: the server's)")
    parser.add_argument("--output", type=Path, help="write every figure and each rewrite as JSON here")
    args = parser.parse_args()

    pairs = load_pairs(args.pairs, args.limit)
    options = OptimizerOptions(seed=args.seed, max_batch_size=1, max_wait_ms=0.0, request_timeout=3600.0)
    if args.max_new_tokens:
        options = OptimizerOptions(**{**asdict(options), "max_new_tokens": args.max_new_tokens})
    reports = []
    for spec in args.optimizer or ["none"]:
        reports.append(asyncio.run(measure(spec, pairs, args.mode, options)))
        print(f"{spec}: done ({len(pairs)} prompts, {args.mode})", file=sys.stderr)
    print_table(reports)
    if args.output:
        payload = {"pairs": str(args.pairs), "mode": args.mode, "seed": args.seed,
                   "results": [{**r.summary(), "samples": r.samples} for r in reports]}
        args.output.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
