"""Real weights (SmolLM2-135M-Instruct as a llama.cpp GGUF): ``bpo train`` fine-tunes it for a few LoRA steps,
and what the real model writes reaches the upstream only when the guard accepts it (never a template echo)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from optimizer.base import MODES, Mode, Optimizer, OptimizerOptions, OptimizerStatus, Rewrite
from optimizer.cache import NullCache
from optimizer.guard import check_rewrite
from optimizer.junk import check_template_echo
from optimizer.manifest import read_manifest
from optimizer.pipeline import Outcome, RewritePipeline
from optimizer.reasons import GUARD_REJECTED
from optimizer.registry import build_optimizer
from tests.fakes.tiny_model import fixture_pairs
from training.cli import main
from training.records import write_jsonl

pytestmark = pytest.mark.slow

# What the untrained SmolLM2 base wrote back for a prompt (issue 14): the optimizer's own instruction.
BASE_MODEL_ECHO = ("You're an expert prompt engineer. Please help me improve this prompt to get a more helpful "
                   "and harmless response:")


def test_a_few_lora_steps_from_the_gguf_base_give_a_servable_model_dir(smollm2_gguf: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, fixture_pairs()[:8])
    output = tmp_path / "smol-bpo"
    code = main(["train", "--base", str(smollm2_gguf), "--data", str(data), "--output", str(output), "--lora",
                 "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2", "--learning-rate", "2e-4",
                 "--max-length", "256", "--eval-fraction", "0.25", "--eval-generate", "0", "--logging-steps", "1"])
    assert code == 0
    manifest = read_manifest(output)
    assert manifest is not None and manifest.base_model == str(smollm2_gguf)
    assert manifest.metrics["steps"] == 2 and manifest.metrics["held_out_pairs"] == 2
    assert manifest.metrics["base_eval_loss"] > 0 and manifest.metrics["eval_loss"] > 0
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("q_proj" in name for name in names) and not any("lora" in name for name in names)
    assert (output / "model.safetensors").stat().st_mode & 0o044 == 0o044
    assert json.loads((output / "config.json").read_text()).get("quantization_config") is None


def test_the_real_models_template_echo_never_reaches_the_upstream(smollm2_gguf: Path) -> None:
    verdict = check_rewrite("Give me three tips for a job interview.", BASE_MODEL_ECHO)
    assert (verdict.accepted, verdict.rule) == (False, "template-echo")

    prompts = [p["prompt"] for p in fixture_pairs()[:3]]
    outcomes, raws = asyncio.run(rewrite_through_the_pipeline(f"hf:{smollm2_gguf}", prompts))
    assert len(raws) == len(outcomes) == 2 * len(prompts)
    for prompt, outcome, raw in zip(prompts * len(MODES), outcomes, raws, strict=True):
        if outcome.applied:
            assert check_rewrite(prompt, outcome.text).accepted and outcome.text == raw
        else:
            assert outcome.text == prompt  # fail open: the user's own words go upstream
        if raw and check_template_echo(prompt, raw) is not None:
            assert (outcome.reason, outcome.guard_rule) == (GUARD_REJECTED, "template-echo")


class Recording:
    """The optimizer, keeping each raw rewrite it wrote (the pipeline keeps only its verdict)."""

    def __init__(self, inner: Optimizer) -> None:
        self.inner = inner
        self.raws: list[str] = []

    @property
    def identity(self) -> str:
        return self.inner.identity

    def status(self) -> OptimizerStatus:
        return self.inner.status()

    async def start(self) -> None:
        await self.inner.start()

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        rewrite = await self.inner.optimize(text, mode)
        self.raws.append("" if rewrite.truncated else rewrite.text.strip())
        return rewrite

    async def close(self) -> None:
        await self.inner.close()


async def rewrite_through_the_pipeline(spec: str, prompts: list[str]) -> tuple[list[Outcome], list[str]]:
    """Each prompt in both modes through the gateway's pipeline; also the raw rewrite the model wrote."""
    recording = Recording(build_optimizer(spec, OptimizerOptions(seed=3, max_batch_size=1, request_timeout=600.0)))
    pipeline = RewritePipeline(recording, NullCache(), timeout=600.0, max_chars=8000)
    await recording.start()
    try:
        while recording.status().state == "loading":
            await asyncio.sleep(0.1)
        assert recording.status().state == "ready", recording.status().detail
        outcomes = [await pipeline.run(prompt, mode) for mode in MODES for prompt in prompts]
    finally:
        await recording.close()
    return outcomes, recording.raws
