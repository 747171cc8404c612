"""Dynamic batching vs one-by-one rewrites, and static batching vs transformers' continuous batching.

Usage: python bench/optimizer_batching.py [--model DIR_OR_GGUF] [--concurrency 8] [--new-tokens 64] [--rounds 3]
       python bench/optimizer_batching.py --model FILE.gguf --natural PAIRS.json [--concurrency 8] [--seed 1]

Without --model it builds the tiny random Llama of the tests (tests/fakes/tiny_model.py), sized by
--hidden / --layers. Every generation runs exactly --new-tokens tokens (EOS is masked), so the timings
compare equal work. Prints, side by side on this device:
  1. the hf: optimizer end to end, N concurrent rewrites batched vs the same N one at a time (target >= 3x);
  2. one static ``generate`` of N prompts vs ``generate_batch`` (continuous batching), tokens/s each.

``--natural PAIRS`` measures what real traffic sees instead: N real prompts of spread-out lengths (the first
N of a pairs / prompts file, every 37th row so short and long mix), EOS not masked, seeded sampling; for one
at a time vs N concurrent it prints the total and each caller's latency (median and worst).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.base import OptimizerOptions
from optimizer.hf import HFOptimizer, LoadedModel, load_model
from optimizer.template import build_prompt

PROMPTS = [
    "Tell me about black holes.", "Write a poem about autumn.", "How do I make pancakes?",
    "Give me 3 tips for better sleep.", "Explain recursion.", "What is machine learning?",
    "Plan a trip to Japan for 7 days.", "Why is the sky blue?", "Describe the water cycle.",
    "Recommend a good book.", "How do vaccines work?", "Tell me a joke.",
]


def fixed_length_loader(target: str, options: OptimizerOptions) -> LoadedModel:
    """The real loader, with EOS masked at the LM head so every rewrite costs the same tokens."""
    loaded = load_model(target, options)
    eos = list(loaded.eos_ids)

    def mask_eos(module: Any, inputs: Any, output: Any) -> Any:
        output[..., eos] = -float("inf")
        return output

    loaded.model.get_output_embeddings().register_forward_hook(mask_eos)
    return loaded


async def timed(work: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def optimizer_seconds(model_dir: str, prompts: list[str], new_tokens: int,
                            rounds: int) -> tuple[list[float], list[float]]:
    """Seconds for the prompts one at a time and all at once, in alternating rounds (same machine load)."""
    def options(batch: int) -> OptimizerOptions:
        return OptimizerOptions(max_new_tokens=new_tokens, max_batch_size=batch, max_wait_ms=5.0)

    sequential = HFOptimizer(model_dir, options(1), loader=fixed_length_loader)
    batched = HFOptimizer(model_dir, options(len(prompts)), loader=fixed_length_loader)
    for optimizer in (sequential, batched):
        await optimizer.start()
        status = await optimizer.wait_loaded()
        if status.state != "ready":
            raise SystemExit(f"optimizer failed to load: {status.detail}")
        await optimizer.optimize("warm up", "stable")

    async def one_by_one() -> None:
        for prompt in prompts:
            await sequential.optimize(prompt, "stable")

    async def concurrent() -> None:
        await asyncio.gather(*(batched.optimize(prompt, "stable") for prompt in prompts))

    try:
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            times[0].append(await timed(one_by_one))
            times[1].append(await timed(concurrent))
        return times
    finally:
        await sequential.close()
        await batched.close()


def engine_tokens_per_second(model_dir: str, prompts: list[str], new_tokens: int, rounds: int) -> dict[str, float]:
    """Raw library calls on the same prompts: one padded ``generate`` vs ``generate_batch``."""
    import torch
    from transformers import GenerationConfig

    loaded = fixed_length_loader(model_dir, OptimizerOptions())
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [build_prompt(p) for p in prompts]
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": new_tokens,
                "pad_token_id": tokenizer.pad_token_id}
    results: dict[str, list[float]] = {"static generate": [], "continuous generate_batch": []}
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    ids = [tokenizer(t).input_ids for t in texts]
    config = GenerationConfig(eos_token_id=-1, **sampling)
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            started = time.perf_counter()
            output = model.generate(**inputs, **sampling)
            static = (output.shape[1] - inputs["input_ids"].shape[1]) * len(texts) / (time.perf_counter() - started)
            started = time.perf_counter()
            outputs = model.generate_batch(ids, generation_config=config, max_new_tokens=new_tokens)
            produced = sum(len(o.generated_tokens) for o in outputs.values())
            continuous = produced / (time.perf_counter() - started)
            if round_index:  # the first round warms both paths up
                results["static generate"].append(static)
                results["continuous generate_batch"].append(continuous)
    return {name: statistics.median(values) for name, values in results.items()}


def natural_prompts(path: str, count: int) -> list[str]:
    """Prompts of the BPO release (``final_input``), a pairs file (``prompt``) or a prompts file (``text``)."""
    import json

    raw = Path(path).read_text()
    rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    texts = [str(r.get("final_input") or r.get("prompt") or r.get("instruction") or r.get("text")) for r in rows]
    return [texts[(i * 37) % len(texts)] for i in range(count)]


async def natural_latencies(model_dir: str, prompts: list[str], seed: int,
                            batch: int) -> tuple[float, list[float], int]:
    """(total seconds, each caller's seconds, truncated count) for the prompts sent at once."""
    options = OptimizerOptions(max_batch_size=batch, max_wait_ms=5.0, seed=seed)
    optimizer = HFOptimizer(model_dir, options, loader=_shared_loader)
    await optimizer.start()
    if (await optimizer.wait_loaded()).state != "ready":
        raise SystemExit(f"optimizer failed to load: {optimizer.status().detail}")
    started = time.perf_counter()

    async def one(prompt: str) -> tuple[float, bool]:
        rewrite = await optimizer.optimize(prompt, "stable")
        return time.perf_counter() - started, rewrite.truncated

    try:
        results = await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await optimizer.close()
    return time.perf_counter() - started, [r[0] for r in results], sum(r[1] for r in results)


_LOADED: dict[str, LoadedModel] = {}


def _shared_loader(target: str, options: OptimizerOptions) -> LoadedModel:
    if target not in _LOADED:  # a GGUF file takes a minute to dequantize: load it once for both runs
        _LOADED[target] = load_model(target, options)
    return _LOADED[target]


def run_natural(model_dir: str, args: argparse.Namespace) -> None:
    from optimizer.hf import pick_device

    prompts = natural_prompts(args.natural, args.concurrency)
    words = sorted(len(p.split()) for p in prompts)
    print(f"device {pick_device(None)}, model {model_dir}, {len(prompts)} real prompts of {words} words, "
          f"stable mode, seed {args.seed}, natural lengths")
    for batch in (1, len(prompts)):
        total, latencies, truncated = asyncio.run(natural_latencies(model_dir, prompts, args.seed, batch))
        print(f"  max batch {batch:2d}: total {total:7.1f} s; caller latency median "
              f"{statistics.median(latencies):6.1f} s, worst {max(latencies):6.1f} s; {truncated} truncated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir or hub id (default: build the tiny test Llama)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent rewrites")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per rewrite")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement (median)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the built tiny model")
    parser.add_argument("--layers", type=int, default=2, help="layers of the built tiny model")
    parser.add_argument("--skip-engines", action="store_true", help="skip the static vs continuous comparison")
    parser.add_argument("--natural", metavar="PAIRS", help="real prompts and natural lengths (see above)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed of --natural")
    args = parser.parse_args()
    if args.natural:
        if not args.model:
            raise SystemExit("--natural needs --model (a real model: the tiny one never stops by itself)")
        run_natural(args.model, args)
        return
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.concurrency)]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or _build(Path(scratch), args.hidden, args.layers)
        run(model_dir, prompts, args)


def _build(scratch: Path, hidden: int, layers: int) -> str:
    from tests.fakes.tiny_model import build_tiny_model

    return str(build_tiny_model(scratch / "tiny", hidden=hidden, layers=layers))


def run(model_dir: str, prompts: list[str], args: argparse.Namespace) -> None:
    from optimizer.hf import pick_device

    n, tokens = len(prompts), args.new_tokens
    print(f"device {pick_device(None)}, model {model_dir}, {n} prompts x {tokens} new tokens, "
          f"median of {args.rounds} rounds")
    sequential_times, batched_times = asyncio.run(optimizer_seconds(model_dir, prompts, tokens, args.rounds))
    sequential, batched = statistics.median(sequential_times), statistics.median(batched_times)
    print(f"  hf optimizer, one at a time : {sequential:7.3f} s  ({n / sequential:6.2f} rewrites/s)")
    print(f"  hf optimizer, {n} concurrent  : {batched:7.3f} s  ({n / batched:6.2f} rewrites/s)")
    print(f"  batched / sequential throughput: {sequential / batched:.2f}x (target >= 3x)")
    if args.skip_engines:
        return
    # On a worker thread, as the hf: backend generates: on CPU, torch runs very differently on the main thread.
    with ThreadPoolExecutor(1) as worker:
        engines = worker.submit(engine_tokens_per_second, model_dir, prompts, tokens, args.rounds).result()
    for name, rate in engines.items():
        print(f"  {name:<27}: {rate:9.1f} tokens/s")
    faster = max(engines, key=lambda name: engines[name])
    print(f"  faster on this device: {faster} "
          f"({engines[faster] / min(engines.values()):.2f}x the other)")


if __name__ == "__main__":
    main()
