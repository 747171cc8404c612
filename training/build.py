"""``bpo data build``: ask an LLM critic about each preference record and keep the rewrites that pass the
filters, as (prompt, optimized prompt) pairs. Resumable: every finished record is on disk at once."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from training.critic import CRITIC_PROMPT_VERSION, CriticParseError, build_critic_messages, parse_critic_output
from training.filters import FilterStats, place_context, rejection_reason
from training.records import JsonlAppender, Record, read_done, stable_key, write_json
from training.run_config import saved_config
from training.sources import FORMATS, load_preferences


@dataclass
class BuildConfig:
    input: str = field(metadata={"help": "preference records (JSON or JSONL), or hf:DATASET_ID[:SPLIT]"})
    output: str = field(metadata={"help": "pairs JSONL to write; re-running appends only what is missing"})
    critic_model: str = field(metadata={"help": "critic model name as litellm knows it (e.g. gpt-4o)"})
    critic_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server for the critic (litellm's openai/ provider)"})
    critic_api_key: str | None = field(default=None, metadata={
        "help": "API key for the critic (default: the provider's own environment variable)"})
    format: str = field(default="records", metadata={
        "help": f"input format: {', '.join(FORMATS)}", "choices": FORMATS})
    rejected_input: str | None = field(default=None, metadata={
        "help": "alpaca-gpt4 only: Alpaca's original answers, joined as the bad responses"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N unique records"})
    concurrency: int = field(default=8, metadata={"help": "critic requests in flight at once"})
    rate: float = field(default=0.0, metadata={
        "help": "at most this many critic requests per second (0: no cap)"})
    max_retries: int = field(default=5, metadata={"help": "retries per request on 429/5xx/timeouts"})
    retry_backoff: float = field(default=1.0, metadata={
        "help": "seconds the first retry waits at most (jittered, doubling each retry)"})
    temperature: float = field(default=0.0, metadata={"help": "critic sampling temperature"})
    max_tokens: int = field(default=2048, metadata={"help": "critic answer token limit"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @property
    def rejected_path(self) -> Path:
        return Path(self.output).with_suffix(".rejected.jsonl")

    @property
    def run_path(self) -> Path:
        return Path(self.output).with_suffix(".run.json")


def record_id(record: Record) -> str:
    """Records with the same instruction and context are one prompt: the key de-duplicates and resumes."""
    return stable_key(" ".join(str(record["instruction"]).split()), " ".join(str(record.get("context") or "").split()))


def unique_records(records: list[Record], stats: FilterStats) -> list[Record]:
    seen: set[str] = set()
    unique = []
    for record in records:
        key = record_id(record)
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        unique.append({**record, "key": key})
    return unique


def judge_record(record: Record, text: str, finish_reason: str | None, config: BuildConfig) -> Record:
    """The pair for one critic answer, or a rejection record carrying ``reason``."""
    try:
        verdict = parse_critic_output(text, finish_reason)
    except CriticParseError as exc:
        return {"key": record["key"], "reason": f"unparsable-{exc.reason}", "instruction": record["instruction"],
                "critic_output": text}
    reason = rejection_reason(record["instruction"], verdict.optimized_instruction, record.get("context") or "")
    if reason:
        return {"key": record["key"], "reason": reason, "instruction": record["instruction"],
                "optimized_instruction": verdict.optimized_instruction, "critic_output": text}
    prompt, optimized = place_context(record["instruction"], record.get("context") or "",
                                      verdict.optimized_instruction)
    ours = {"prompt": prompt, "optimized_prompt": optimized,
            "optimized_instruction": verdict.optimized_instruction, "comparison": verdict.comparison,
            "critic_model": config.critic_model, "critic_prompt_version": CRITIC_PROMPT_VERSION}
    # The input's own fields are kept as provenance; ours win where names collide (e.g. a reference
    # optimized_prompt in the input).
    kept = {name: value for name, value in record.items() if name not in ours}
    return {"key": record["key"], "prompt": prompt, "optimized_prompt": optimized, **kept, **ours}


async def run_critic(todo: list[Record], config: BuildConfig, stats: FilterStats) -> None:
    from tqdm import tqdm

    from training.chat import ChatClient, ChatModel
    from training.errors import ChatError

    model = ChatModel(config.critic_model, config.critic_base_url, config.critic_api_key,
                      config.temperature, config.max_tokens)
    client = ChatClient(model, config.concurrency, config.rate, config.max_retries, config.retry_backoff)
    queue: asyncio.Queue[Record] = asyncio.Queue()
    for record in todo:
        queue.put_nowait(record)
    bar = tqdm(total=len(todo), desc="critic", unit="record", disable=not config.progress)
    with JsonlAppender(config.output) as pairs, JsonlAppender(config.rejected_path) as rejected:

        async def worker() -> None:
            while not queue.empty():
                record = queue.get_nowait()
                try:
                    answer = await client.complete(build_critic_messages(record))
                except ChatError as exc:
                    stats.errors += 1  # not written: the next run asks again
                    print(f"critic failed on {record['key']}: {exc}", file=sys.stderr)
                else:
                    result = judge_record(record, answer.text, answer.finish_reason, config)
                    if "reason" in result:
                        stats.dropped[result["reason"]] += 1
                        rejected.write(result)
                    else:
                        stats.kept += 1
                        pairs.write(result)
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(max(1, config.concurrency))))
    bar.close()


def main(config: BuildConfig) -> FilterStats:
    stats = FilterStats()
    records = load_preferences(config.input, config.format, config.rejected_input)
    stats.total = len(records)
    unique = unique_records(records, stats)[: config.limit]
    done = {r["key"] for r in read_done(config.output, "key")}
    done |= {r["key"] for r in read_done(config.rejected_path, "key")}
    todo = [record for record in unique if record["key"] not in done]
    stats.resumed = len(unique) - len(todo)
    asyncio.run(run_critic(todo, config, stats))
    write_json(config.run_path, {"stage": "data build", "config": saved_config(config), "stats": stats.as_dict(),
                                 "critic_prompt_version": CRITIC_PROMPT_VERSION,
                                 "finished": datetime.now(UTC).isoformat()})
    print_stats(stats, config)
    return stats


def print_stats(stats: FilterStats, config: BuildConfig) -> None:
    from rich.table import Table

    from training.report import console

    table = Table(title=f"bpo data build -> {config.output}")
    table.add_column("records")
    table.add_column("count", justify="right")
    rows = [("input", stats.total), ("duplicates skipped", stats.duplicates),
            ("already done (resumed)", stats.resumed), ("kept this run", stats.kept),
            *((f"dropped: {reason}", count) for reason, count in sorted(stats.dropped.items())),
            ("critic errors (retry by re-running)", stats.errors)]
    for name, count in rows:
        table.add_row(name, str(count))
    console().print(table)
