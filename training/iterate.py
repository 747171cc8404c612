"""``bpo data iterate``: iterative BPO — optimize each prompt, then optimize the result again, k rounds.

Writes one pairs record per prompt (``optimized_prompt`` is the last round, ``rounds`` holds them all),
so the output feeds ``bpo eval --prompts`` (as references) or another ``bpo train``. Resumable."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from training.errors import ConfigError
from training.records import JsonlAppender, Record, prompt_parts, read_done, read_records, stable_key, write_json
from training.run_config import saved_config


@dataclass
class IterateConfig:
    input: str = field(metadata={
        "help": "prompts (JSON or JSONL with prompt, instruction (+context) or text)"})
    output: str = field(metadata={"help": "JSONL of prompt, optimized_prompt (last round) and every round"})
    optimizer: str = field(metadata={"help": "optimizer spec: hf:DIR, remote:URL, llm:MODEL"})
    rounds: int = field(default=3, metadata={"help": "how many times to optimize each prompt"})
    mode: str = field(default="stable", metadata={"help": "optimizer decoding mode",
                                                  "choices": ("stable", "aggressive")})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    concurrency: int = field(default=8, metadata={"help": "prompts in flight at once"})
    seed: int | None = field(default=None, metadata={"help": "optimizer sampling seed"})
    max_new_tokens: int = field(default=256, metadata={"help": "optimizer rewrite token limit"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


async def iterate(config: IterateConfig, prompts: list[Record]) -> int:
    from tqdm import tqdm

    from optimizer.base import Mode, OptimizerError
    from training.optimizing import optimize_rounds, start_optimizer

    mode: Mode = "aggressive" if config.mode == "aggressive" else "stable"
    optimizer = await start_optimizer(config.optimizer, seed=config.seed, max_new_tokens=config.max_new_tokens)
    errors = 0
    try:
        done = {record["key"] for record in read_done(config.output)}
        todo = [p for p in prompts if stable_key(optimizer.identity, mode, str(config.rounds), p["prompt"]) not in done]
        semaphore = asyncio.Semaphore(max(1, config.concurrency))
        bar = tqdm(total=len(todo), desc="iterate", unit="prompt", disable=not config.progress)
        with JsonlAppender(config.output) as output:

            async def one(prompt: Record) -> None:
                nonlocal errors
                async with semaphore:
                    try:
                        rounds = await optimize_rounds(optimizer, prompt["prompt"], mode, config.rounds)
                    except OptimizerError as exc:
                        errors += 1
                        print(f"optimizer failed on {prompt['prompt'][:60]!r}: {exc}", file=sys.stderr)
                    else:
                        key = stable_key(optimizer.identity, mode, str(config.rounds), prompt["prompt"])
                        output.write({"key": key, **prompt, "optimized_prompt": rounds[-1], "rounds": rounds,
                                      "optimizer": optimizer.identity, "mode": config.mode})
                    bar.update(1)

            await asyncio.gather(*(one(p) for p in todo))
        bar.close()
    finally:
        await optimizer.close()
    return errors


def main(config: IterateConfig) -> int:
    if config.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    prompts = [{"prompt": prompt_parts(r).text} for r in read_records(config.input)[: config.limit]]
    errors = asyncio.run(iterate(config, prompts))
    write_json(Path(config.output).with_suffix(".run.json"), {
        "stage": "data iterate", "config": saved_config(config), "prompts": len(prompts), "errors": errors,
        "finished": datetime.now(UTC).isoformat()})
    print(f"wrote {config.output}: {len(prompts) - errors} prompt(s), {config.rounds} round(s) each"
          + (f", {errors} failed (re-run to retry)" if errors else ""))
    return errors
