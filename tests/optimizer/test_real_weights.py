"""Real weights: SmolLM2-135M-Instruct from its GGUF file through the hf: backend (slow; run in CI)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from optimizer.base import OptimizerOptions
from optimizer.cache import LocalTier, MemoryCache
from optimizer.hf import HFOptimizer, LoadedModel, load_model
from optimizer.pipeline import RewritePipeline
from optimizer.template import BANNED_STRINGS

# Dequantizing the GGUF alone took over 5 minutes (the default test timeout) on a machine shared 8 ways.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

OPTIONS = OptimizerOptions(max_new_tokens=32, max_batch_size=4, max_wait_ms=50, seed=1)
LONG_PROMPT = ("Jason led the Argonauts to Colchis for the golden fleece, helped by Medea. " * 8
               + "Which poet wrote the Argonautica, and when?")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> LoadedModel:
    """The GGUF dequantized once for this module (about a minute on a busy CPU)."""
    return load_model(str(smollm2_gguf), OptimizerOptions())


@contextlib.contextmanager
def never_ending(loaded: LoadedModel) -> Iterator[None]:
    """The real model with its EOS masked: it rambles on as issue 14's 298-word rewrite did."""
    def mask_eos(module: Any, inputs: Any, output: Any) -> Any:
        output[..., loaded.eos_ids] = -float("inf")
        return output

    handle = loaded.model.get_output_embeddings().register_forward_hook(mask_eos)
    try:
        yield
    finally:
        handle.remove()


def test_gguf_loads_as_a_llama_with_its_tokenizer(smollm2: LoadedModel, smollm2_gguf: Path) -> None:
    assert smollm2.model.config.model_type == "llama" and smollm2.device == "cpu"
    assert smollm2.identity.startswith(f"hf:{smollm2_gguf.name}@")
    assert smollm2.tokenizer.eos_token_id in smollm2.eos_ids and smollm2.newline_ids
    decoded = {smollm2.tokenizer.decode(ids).strip() for ids in smollm2.bad_words_ids}
    assert decoded == set(BANNED_STRINGS)


async def test_real_rewrites_in_both_modes(smollm2: LoadedModel) -> None:
    optimizer = HFOptimizer("smollm2", OPTIONS, loader=lambda target, options: smollm2)
    await optimizer.start()
    assert (await optimizer.wait_loaded()).state == "ready"
    try:
        stable = await optimizer.optimize("Tell me about black holes.", "stable")
        aggressive = await optimizer.optimize("Tell me about black holes.", "aggressive")
        repeated = await optimizer.optimize("Tell me about black holes.", "stable")
    finally:
        await optimizer.close()
    assert repeated == stable  # seeded
    # Aggressive mode: at least prompt + 5 tokens, one line, no critic marker.
    assert aggressive.truncated or (aggressive.text and "\n" not in aggressive.text)
    assert not any(marker in aggressive.text for marker in BANNED_STRINGS)


async def test_a_real_rewrite_cut_at_its_budget_is_never_forwarded(smollm2: LoadedModel) -> None:
    optimizer = HFOptimizer("smollm2", OPTIONS, loader=lambda target, options: smollm2)
    await optimizer.start()
    await optimizer.wait_loaded()
    pipeline = RewritePipeline(optimizer, MemoryCache(LocalTier(10, 1 << 20, 60)), timeout=600.0, max_chars=8000)
    try:
        with never_ending(smollm2):
            rewrite = await optimizer.optimize(LONG_PROMPT, "stable")
            outcome = await pipeline.run(LONG_PROMPT, "stable")
    finally:
        await optimizer.close()
    assert rewrite.truncated and len(rewrite.text.split()) > 5  # real words, but only 32 tokens of them
    assert (outcome.applied, outcome.reason, outcome.text) == (False, "truncated", LONG_PROMPT)


async def test_aggressive_minimum_past_the_cap_is_truncated_without_generating(smollm2: LoadedModel) -> None:
    optimizer = HFOptimizer("smollm2", replace(OPTIONS, max_new_tokens=64), loader=lambda target, options: smollm2)
    await optimizer.start()
    await optimizer.wait_loaded()
    try:
        rewrite = await optimizer.optimize(LONG_PROMPT, "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.truncated and rewrite.text == ""
