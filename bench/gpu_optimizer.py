"""The optimizer's speed on a GPU: a 7B Llama-shaped model with random weights (BPO's compute, no download).

Usage (one device call, well under 8 minutes on an H100):
    python bench/gpu_optimizer.py [--json OUT.json] [--budget-s 420] [--skip-compile]
Smoke test on CPU (seconds, a tiny model, the same code paths):
    python bench/gpu_optimizer.py --tiny

Measures, printing each figure as soon as it exists:
  1. batch-1 inter-token latency of ``generate`` (eager, dynamic cache) against the memory-bandwidth floor
     (weight bytes / HBM bandwidth; target <= 1.4x, i.e. <= 5.6 ms/token on an H100);
  2. the same with a static KV cache, which makes ``generate`` compile the forward (CUDA graphs);
  3. throughput of the real serving path (``HFOptimizer``: dynamic batcher + ``generate``) at 1, 8 and 32
     concurrent rewrites of --new-tokens tokens each (target: 32 concurrent >= 20x batch 1), eager and,
     budget permitting, with the static cache;
  4. transformers' continuous batching (``generate_batch``) on the same 32 prompts, for the engine choice.
EOS is masked at the LM head so every rewrite costs exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer_batching import PROMPTS  # bench/ is this script's directory: one prompt set

from optimizer.base import OptimizerOptions
from optimizer.hf import HFOptimizer, LoadedModel, prepare_loaded
from optimizer.template import build_prompt

# HBM bandwidth in TB/s by GPU name (first match wins); --bandwidth-tbs overrides.
BANDWIDTH_TBS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0), ("L40S", 0.864),
                 ("A10G", 0.6), ("L4", 0.3))
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 1024}


@dataclass
class Bench:
    """The model under test and the run's limits; results collect in ``results``."""

    loaded: LoadedModel
    device: str
    new_tokens: int
    concurrency: tuple[int, ...]
    deadline: float
    results: dict[str, Any]

    def report(self, key: str, value: Any, line: str) -> None:
        self.results[key] = value
        print(line, flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def build_model(shape: dict[str, Any], device: str, scratch: Path) -> LoadedModel:
    """A random-weight Llama of ``shape`` built directly on ``device``, with the tests' trained tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.fakes.tiny_model import build_tokenizer

    build_tokenizer(scratch)
    tokenizer = AutoTokenizer.from_pretrained(scratch)
    # Pad the vocabulary with inert tokens so the LM head has the real model's size and every id decodes.
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded = prepare_loaded("random-llama", model, tokenizer, device, str(dtype).removeprefix("torch."))
    mask_eos(loaded)
    return loaded


def mask_eos(loaded: LoadedModel) -> None:
    eos = list(loaded.eos_ids)

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        output[..., eos] = -float("inf")
        return output

    loaded.model.get_output_embeddings().register_forward_hook(hook)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TokenClock:
    """A ``generate`` streamer that timestamps every token as it is produced (batch 1)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def inter_token_latency(bench: Bench, static: bool, rounds: int = 3) -> float:
    """Median seconds between decoded tokens at batch 1, prefill excluded, one ``generate`` shape throughout.

    The streamer's first call is the prompt, its second the first new token (after prefill); the rest are
    decoding steps. With a static cache the first round compiles the forward and is not counted.
    """
    import torch

    tokenizer, model = bench.loaded.tokenizer, bench.loaded.model
    inputs = tokenizer([build_prompt(PROMPTS[0])], return_tensors="pt").to(model.device)
    extra = {"cache_implementation": "static"} if static else {}
    latencies = []
    for round_index in range(rounds + 1):
        clock = TokenClock(bench.device)
        with torch.inference_mode():
            model.generate(**inputs, do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=bench.new_tokens,
                           pad_token_id=tokenizer.pad_token_id, streamer=clock, **extra)
        if round_index:
            decoded = clock.times[1:]
            latencies.append((decoded[-1] - decoded[0]) / (len(decoded) - 1))
    return statistics.median(latencies)


async def serving_throughput(bench: Bench, concurrency: int) -> float:
    """Tokens/s through HFOptimizer with ``concurrency`` rewrites in flight at once."""
    options = OptimizerOptions(max_new_tokens=bench.new_tokens, max_batch_size=max(bench.concurrency),
                               max_wait_ms=5.0)
    optimizer = HFOptimizer("random-llama", options, loader=lambda target, opts: bench.loaded)
    await optimizer.start()
    await optimizer.wait_loaded()
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(concurrency)]
    try:
        await asyncio.gather(*(optimizer.optimize(p, "stable") for p in prompts))  # warm-up at this shape
        synchronize(bench.device)
        started = time.perf_counter()
        await asyncio.gather(*(optimizer.optimize(p, "stable") for p in prompts))
        synchronize(bench.device)
        elapsed = time.perf_counter() - started
    finally:
        await optimizer.close()  # stops its worker thread; the model itself stays with the bench
    return concurrency * bench.new_tokens / elapsed


def continuous_batching_throughput(bench: Bench, concurrency: int) -> float:
    import torch
    from transformers import GenerationConfig

    tokenizer, model = bench.loaded.tokenizer, bench.loaded.model
    ids = [tokenizer(build_prompt(PROMPTS[i % len(PROMPTS)] + f" ({i})")).input_ids for i in range(concurrency)]
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=bench.new_tokens,
                              eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate_batch(ids, generation_config=config)  # warm-up
        synchronize(bench.device)
        started = time.perf_counter()
        outputs = model.generate_batch(ids, generation_config=config)
        synchronize(bench.device)
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    return produced / (time.perf_counter() - started)


def run_phase(bench: Bench, name: str, needs_s: float, phase: Callable[[], None]) -> None:
    if bench.time_left() < needs_s:
        print(f"skipped {name}: {bench.time_left():.0f} s left of the budget", flush=True)
        return
    try:
        phase()
    except Exception as exc:  # one failing engine must not hide the other figures
        bench.report(f"{name}_error", f"{type(exc).__name__}: {exc}", f"{name} failed: {type(exc).__name__}: {exc}")


def measure_latency(bench: Bench, floor_ms: float, static: bool) -> None:
    label = "static cache + compile" if static else "eager"
    itl_ms = inter_token_latency(bench, static) * 1000
    versus = (f"= {itl_ms / floor_ms:5.2f}x the floor (target <= 1.4x = {1.4 * floor_ms:.2f} ms)" if floor_ms
              else "(no bandwidth floor for this device)")
    bench.report(f"itl_ms_{'static' if static else 'eager'}", itl_ms,
                 f"batch-1 inter-token latency, {label:<22}: {itl_ms:7.2f} ms/token {versus}")


def measure_serving(bench: Bench, static: bool) -> None:
    label = "static" if static else "eager"
    bench.loaded.model.generation_config.cache_implementation = "static" if static else None
    rates = {}
    for concurrency in bench.concurrency:
        rates[concurrency] = asyncio.run(serving_throughput(bench, concurrency))
        bench.report(f"serving_{label}_{concurrency}", rates[concurrency],
                     f"serving path ({label}), {concurrency:>2} concurrent: {rates[concurrency]:9.1f} tokens/s")
    bench.loaded.model.generation_config.cache_implementation = None
    top, base = max(bench.concurrency), min(bench.concurrency)
    ratio = rates[top] / rates[base]
    bench.report(f"serving_{label}_ratio", ratio,
                 f"serving path ({label}): {top} concurrent = {ratio:.1f}x batch {base} (target >= 20x)")


def measure_continuous(bench: Bench) -> None:
    concurrency = max(bench.concurrency)
    rate = continuous_batching_throughput(bench, concurrency)
    bench.report("continuous_batching", rate,
                 f"continuous batching generate_batch, {concurrency} prompts: {rate:9.1f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    parser.add_argument("--new-tokens", type=int, help="tokens per rewrite (default 100; 16 with --tiny)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip later phases past this many seconds")
    parser.add_argument("--skip-compile", action="store_true", help="skip the static-cache (compiled) phases")
    parser.add_argument("--bandwidth-tbs", type=float, help="HBM bandwidth in TB/s (default: from the GPU name)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    started = time.monotonic()
    results: dict[str, Any] = {}
    try:
        run(args, started, results)
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace, started: float, results: dict[str, Any]) -> None:
    import torch
    import transformers

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as scratch:
        loaded = build_model(TINY if args.tiny else LLAMA_7B, device, Path(scratch))
    bench = Bench(loaded, device, args.new_tokens or (16 if args.tiny else 100),
                  (1, 4, 8) if args.tiny else (1, 8, 32), started + args.budget_s, results)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = args.bandwidth_tbs or next((tbs for key, tbs in BANDWIDTH_TBS if key in name), 0.0)
    floor_ms = weight_bytes / (bandwidth * 1e12) * 1000 if bandwidth else 0.0
    bench.report("device", name, f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
                                 f"built in {time.monotonic() - started:.0f} s")
    bench.report("floor_ms", floor_ms, f"model {weight_bytes / 1e9:.2f} GB of weights; memory-bandwidth floor "
                                       f"{floor_ms:.2f} ms/token at {bandwidth} TB/s")
    run_phase(bench, "latency_eager", 20, lambda: measure_latency(bench, floor_ms, static=False))
    run_phase(bench, "serving_eager", 40, lambda: measure_serving(bench, static=False))
    run_phase(bench, "continuous_batching", 40, lambda: measure_continuous(bench))
    if not args.skip_compile:
        run_phase(bench, "latency_static", 120, lambda: measure_latency(bench, floor_ms, static=True))
        run_phase(bench, "serving_static", 200, lambda: measure_serving(bench, static=True))
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
