"""``bpo eval``: the target model answers each original and optimized prompt, a judge compares the two
answers in both orders, and the table reports win/tie/loss and ΔWR per prompt set. Resumable."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.judge import (
    JUDGE_PROMPT_VERSION,
    Outcome,
    Tally,
    average_delta_wr,
    build_judge_messages,
    combine_orders,
    parse_verdict,
    tally,
)
from training.errors import ConfigError, DataError
from training.records import JsonlAppender, PromptParts, Record, prompt_parts, read_done, read_records, stable_key
from training.run_config import saved_config

if TYPE_CHECKING:
    from optimizer.base import Optimizer
    from training.chat import ChatClient


@dataclass
class EvalConfig:
    prompts: list[str] = field(metadata={
        "help": "prompt file(s), JSON or JSONL with prompt, instruction (+context) or text; repeat the flag "
                "for several sets, each named after its file", "metavar": "FILE"})
    optimizer: str = field(metadata={"help": "optimizer spec: hf:DIR, remote:URL, llm:MODEL"})
    target_model: str | None = field(default=None, metadata={
        "help": "the model that answers both prompts (required unless --offline)"})
    judge_model: str | None = field(default=None, metadata={
        "help": "the model that compares the answers (required unless --offline)"})
    target_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server of the target"})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server of the judge"})
    target_api_key: str | None = field(default=None, metadata={"help": "API key for the target"})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key for the judge"})
    limit: int | None = field(default=None, metadata={
        "help": "evaluate only the first N prompts of each set"})
    output: str = field(default="bpo-eval/results.jsonl", metadata={
        "help": "results JSONL (resumable: re-running skips prompts already judged for this run)"})
    mode: str = field(default="stable", metadata={"help": "optimizer decoding mode",
                                                  "choices": ("stable", "aggressive")})
    rounds: int = field(default=1, metadata={"help": "optimize the optimized prompt again, k rounds in all"})
    context: str = field(default="include", metadata={
        "help": "include: the optimizer sees instruction + context, as the proxy does; append: it sees the "
                "instruction only and the context is appended to both prompts unchanged",
        "choices": ("include", "append")})
    guard: bool = field(default=False, metadata={
        "help": "apply the proxy's fidelity guard: a rejected rewrite is replaced by the original"})
    offline: bool = field(default=False, metadata={
        "help": "only rewrite and report offline metrics (no target or judge calls)"})
    concurrency: int = field(default=8, metadata={"help": "prompts in flight at once"})
    rate: float = field(default=0.0, metadata={"help": "max requests per second to each model (0: no cap)"})
    max_retries: int = field(default=5, metadata={"help": "retries per request on 429/5xx/timeouts"})
    retry_backoff: float = field(default=1.0, metadata={
        "help": "seconds the first retry waits at most (jittered, doubling each retry)"})
    target_max_tokens: int = field(default=1024, metadata={"help": "token limit of the target's answers"})
    judge_max_tokens: int = field(default=1024, metadata={"help": "token limit of the judge's answers"})
    seed: int | None = field(default=None, metadata={"help": "optimizer sampling seed"})
    max_new_tokens: int = field(default=256, metadata={"help": "optimizer rewrite token limit"})
    plot: str | None = field(default=None, metadata={"help": "write a win/tie/loss bar chart PNG here"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def check(self) -> None:
        if not self.offline and not (self.target_model and self.judge_model):
            raise ConfigError("--target-model and --judge-model are required (or pass --offline)")
        if self.rounds < 1:
            raise ConfigError("--rounds must be at least 1")


@dataclass(frozen=True)
class EvalItem:
    set_name: str
    item_id: str
    parts: PromptParts
    reference: str | None


def set_name(path: str, taken: set[str]) -> str:
    stem = Path(path).stem
    return stem if stem not in taken else Path(path).name


def load_prompt_sets(paths: Sequence[str], limit: int | None) -> list[EvalItem]:
    """Items of every prompt file; the shared Vicuna / Dolly / Self-Instruct / pairs files load as they are."""
    items: list[EvalItem] = []
    names: set[str] = set()
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such prompt file")
        name = set_name(path, names)
        names.add(name)
        for index, record in enumerate(read_records(path)[:limit]):
            item_id = next((record[k] for k in ("question_id", "id", "idx") if k in record), index)
            reference = record.get("final_output") or record.get("optimized_prompt")
            items.append(EvalItem(name, str(item_id), prompt_parts(record), reference))
    return items


@dataclass
class Runner:
    """Everything one evaluation run shares: the optimizer, the two chat clients and the output file."""

    config: EvalConfig
    optimizer: Optimizer
    run_id: str
    target: ChatClient | None
    judge: ChatClient | None
    errors: int = 0

    def key(self, item: EvalItem) -> str:
        return stable_key(self.run_id, item.set_name, item.item_id, item.parts.text)


async def rewrite_item(runner: Runner, item: EvalItem) -> Record:
    """The optimized prompt (after every round, and the guard if asked) and its provenance."""
    from optimizer.base import Mode
    from training.filters import place_context
    from training.optimizing import optimize_rounds

    config, original = runner.config, item.parts.text
    mode: Mode = "aggressive" if config.mode == "aggressive" else "stable"
    source = item.parts.instruction if config.context == "append" else original
    rounds = await optimize_rounds(runner.optimizer, source, mode, config.rounds)
    optimized = rounds[-1]
    if config.context == "append" and item.parts.context:
        optimized = place_context(item.parts.instruction, item.parts.context, optimized)[1]
    record: Record = {"key": runner.key(item), "run": runner.run_id, "set": item.set_name, "id": item.item_id,
                      "prompt": original, "optimized_prompt": optimized, "reference": item.reference,
                      "optimizer": runner.optimizer.identity, "mode": config.mode, "rounds": rounds}
    if config.guard:
        from optimizer.guard import check_rewrite

        verdict = check_rewrite(original, optimized)
        if not verdict.accepted:
            record.update(optimized_prompt=original, guard_rejected=verdict.rule)
    return record


async def judge_item(runner: Runner, record: Record) -> Record:
    """Answer both prompts with the target and judge the answers in both orders."""
    assert runner.target is not None and runner.judge is not None
    original, optimized = record["prompt"], record["optimized_prompt"]
    if " ".join(original.split()) == " ".join(optimized.split()):
        # The same prompt reaches the target either way: nothing to judge, it is a tie by construction.
        return {**record, "unchanged": True, "verdicts": ["tie", "tie"], "outcome": "tie"}
    answers = await asyncio.gather(*(runner.target.complete([{"role": "user", "content": text}])
                                     for text in (original, optimized)))
    original_answer, optimized_answer = answers[0].text, answers[1].text
    judged = await asyncio.gather(
        runner.judge.complete(build_judge_messages(original, original_answer, optimized_answer)),
        runner.judge.complete(build_judge_messages(original, optimized_answer, original_answer)))
    verdicts = [parse_verdict(answer.text) for answer in judged]
    return {**record, "original_answer": original_answer, "optimized_answer": optimized_answer,
            "judge_outputs": [answer.text for answer in judged], "verdicts": verdicts,
            "outcome": combine_orders(verdicts[0], verdicts[1]), "target_model": runner.config.target_model,
            "judge_model": runner.config.judge_model, "judge_prompt_version": JUDGE_PROMPT_VERSION}


async def evaluate_items(runner: Runner, todo: list[EvalItem]) -> None:
    from tqdm import tqdm

    from optimizer.base import OptimizerError
    from training.errors import ChatError

    queue: asyncio.Queue[EvalItem] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), desc="eval", unit="prompt", disable=not runner.config.progress)
    with JsonlAppender(runner.config.output) as results:

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                try:
                    record = await rewrite_item(runner, item)
                    if not runner.config.offline:
                        record = await judge_item(runner, record)
                except (OptimizerError, ChatError) as exc:
                    runner.errors += 1  # not written: the next run retries this prompt
                    print(f"eval failed on {item.set_name}/{item.item_id}: {exc}", file=sys.stderr)
                else:
                    results.write(record)
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(max(1, runner.config.concurrency))))
    bar.close()


def build_clients(config: EvalConfig) -> tuple[ChatClient | None, ChatClient | None]:
    from training.chat import ChatClient, ChatModel

    if config.offline:
        return None, None
    assert config.target_model is not None and config.judge_model is not None
    target = ChatModel(config.target_model, config.target_base_url, config.target_api_key,
                       max_tokens=config.target_max_tokens)
    judge = ChatModel(config.judge_model, config.judge_base_url, config.judge_api_key,
                      max_tokens=config.judge_max_tokens)
    limits = (config.concurrency * 2, config.rate, config.max_retries, config.retry_backoff)
    return ChatClient(target, *limits), ChatClient(judge, *limits)


def run_identity(config: EvalConfig, optimizer_identity: str) -> str:
    """Results are resumed only for the same optimizer version, decoding, rounds, models and judge prompt."""
    return stable_key(optimizer_identity, config.mode, str(config.rounds), config.context, str(config.guard),
                      str(config.offline), config.target_model or "", config.judge_model or "",
                      JUDGE_PROMPT_VERSION)


async def run(config: EvalConfig, items: list[EvalItem]) -> tuple[str, int]:
    from training.optimizing import start_optimizer

    optimizer = await start_optimizer(config.optimizer, seed=config.seed, max_new_tokens=config.max_new_tokens)
    try:
        target, judge = build_clients(config)
        runner = Runner(config, optimizer, run_identity(config, optimizer.identity), target, judge)
        done = {record["key"] for record in read_done(config.output)}
        await evaluate_items(runner, [item for item in items if runner.key(item) not in done])
        return runner.run_id, runner.errors
    finally:
        await optimizer.close()


@dataclass(frozen=True)
class Summary:
    tallies: list[Tally]
    offline: dict[str, dict[str, Any]]

    @property
    def average_delta_wr(self) -> float:
        return average_delta_wr(self.tallies)

    def as_dict(self) -> dict[str, Any]:
        sets = {t.name: {"win": t.win, "tie": t.tie, "loss": t.loss, "invalid": t.invalid, "judged": t.judged,
                         "win_pct": t.percent(t.win), "tie_pct": t.percent(t.tie),
                         "loss_pct": t.percent(t.loss), "delta_wr": t.delta_wr, **self.offline.get(t.name, {})}
                for t in self.tallies}
        return {"sets": sets, "average_delta_wr": self.average_delta_wr}


def outcome_of(record: Record) -> Outcome:
    """The outcome from the stored verdicts, so a table can be recomputed from a results file."""
    first, second = record["verdicts"]
    return combine_orders(first, second)


def summarize(records: Sequence[Record], set_order: Sequence[str] | None = None) -> Summary:
    """Tallies and offline metrics per set, in ``set_order`` (else first-seen order)."""
    from training.metrics import rewrite_metrics

    names = list(dict.fromkeys([*(set_order or []), *(r["set"] for r in records)]))
    tallies, offline = [], {}
    for name in names:
        rows = [r for r in records if r["set"] == name]
        if not rows:
            continue
        tallies.append(tally(name, (outcome_of(r) for r in rows if "verdicts" in r)))
        offline[name] = rewrite_metrics([r["prompt"] for r in rows], [r["optimized_prompt"] for r in rows],
                                        [r.get("reference") for r in rows]).as_dict()
    return Summary(tallies, offline)


def main(config: EvalConfig) -> Summary:
    from training.records import write_json
    from training.report import console, plot_tallies, results_table

    config.check()
    items = load_prompt_sets(config.prompts, config.limit)
    run_id, errors = asyncio.run(run(config, items))
    records = [r for r in read_done(config.output) if r.get("run") == run_id]
    summary = summarize(records, list(dict.fromkeys(item.set_name for item in items)))
    title = f"{config.optimizer} vs original — " + (
        "offline metrics only" if config.offline else f"target {config.target_model}, judge {config.judge_model}")
    console().print(results_table(summary.tallies, summary.offline, title))
    if errors:
        print(f"{errors} prompt(s) failed and were not recorded; re-run to retry them", file=sys.stderr)
    if config.plot and not config.offline:
        plot_tallies(summary.tallies, config.plot, title)
    write_json(Path(config.output).with_suffix(".summary.json"), {
        "stage": "eval", "config": saved_config(config), "run": run_id, "errors": errors, **summary.as_dict(),
        "finished": datetime.now(UTC).isoformat()})
    return summary
