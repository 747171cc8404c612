"""The hf: backend on the tiny random Llama: loading, decoding settings in generate, batching, failures."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from optimizer.base import Optimizer, OptimizerBusy, OptimizerOptions, OptimizerUnavailable
from optimizer.budget import MIN_BUDGET_TOKENS, token_budget
from optimizer.hf import HFOptimizer, LoadedModel, banned_word_ids, default_batch_size, model_source, prepare_loaded
from optimizer.hf_decoding import RowMinNewTokens, SeededRowSampler, effective_top_k
from optimizer.manifest import Manifest, write_manifest
from optimizer.registry import build_optimizer
from optimizer.template import BANNED_STRINGS

# Real (tiny) transformers models load and generate here.
pytestmark = pytest.mark.slow

OPTIONS = OptimizerOptions(max_new_tokens=24, max_batch_size=8, max_wait_ms=50)


def recording_class(bias: Callable[[Any, Any], None] | None = None) -> Any:
    """A real LlamaForCausalLM subclass that records what ``generate`` was given and what it returned.

    ``bias(logits, config)`` may nudge the logits in ``forward`` so tests can steer the random model.
    """
    from transformers import LlamaForCausalLM

    class RecordingLlama(LlamaForCausalLM):
        calls: list[dict[str, Any]]

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            output = super().forward(*args, **kwargs)
            if bias is not None:
                bias(output.logits, self.config)
            return output

        def generate(self, *args: Any, **kwargs: Any) -> Any:
            sequences = super().generate(*args, **kwargs)
            self.calls.append({"kwargs": kwargs, "prompt_length": kwargs["input_ids"].shape[1],
                               "sequences": sequences})
            return sequences

    RecordingLlama.calls = []
    return RecordingLlama


def loader_for(model_class: Any) -> Callable[[str, OptimizerOptions], LoadedModel]:
    def load(target: str, options: OptimizerOptions) -> LoadedModel:
        from transformers import AutoTokenizer

        model = model_class.from_pretrained(target).eval()
        return prepare_loaded(target, model, AutoTokenizer.from_pretrained(target), "cpu", "float32")

    return load


async def ready(optimizer: HFOptimizer) -> HFOptimizer:
    await optimizer.start()
    status = await optimizer.wait_loaded()
    assert status.state == "ready", status.detail
    return optimizer


@pytest.fixture
async def recorded(tiny_model_dir: Path) -> AsyncIterator[tuple[HFOptimizer, Any]]:
    model_class = recording_class()
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), OPTIONS, loader=loader_for(model_class)))
    yield optimizer, model_class
    await optimizer.close()


async def test_loads_in_background_then_serves(tiny_model_dir: Path) -> None:
    sizes: list[int] = []
    optimizer = build_optimizer(f"hf:{tiny_model_dir}", replace(OPTIONS, on_batch=sizes.append))
    assert isinstance(optimizer, HFOptimizer) and isinstance(optimizer, Optimizer)
    assert optimizer.status().state == "loading"
    with pytest.raises(OptimizerUnavailable):
        await optimizer.optimize("too early", "stable")
    await ready(optimizer)
    try:
        status = optimizer.status()
        assert status.detail.endswith("on cpu (float32)") and status.speed is None  # offline: not measured
        assert optimizer.identity.startswith(f"hf:{tiny_model_dir.name}@") and "pending" not in optimizer.identity
        assert optimizer.loaded is not None and optimizer.loaded.tokenizer.padding_side == "left"
        rewrite = await optimizer.optimize("Tell me about black holes.", "stable")
        assert rewrite.optimizer == optimizer.identity and isinstance(rewrite.text, str)
        assert sizes == [1]
    finally:
        await optimizer.close()
    assert optimizer.status().state == "failed" and optimizer.status().detail == "closed"


async def test_manifest_names_the_identity(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    write_manifest(model_dir, Manifest(name="bpo-tiny", version="3", base_model="tiny", data_sha256="0" * 64,
                                       template_version="1", created="2026-01-01T00:00:00Z"))
    optimizer = await ready(HFOptimizer(str(model_dir), OPTIONS))
    await optimizer.close()
    assert optimizer.identity == "hf:bpo-tiny@3"


async def test_stable_mode_settings_reach_generate(recorded: tuple[HFOptimizer, Any]) -> None:
    optimizer, model_class = recorded
    await optimizer.optimize("Tell me about black holes.", "stable")
    (call,) = model_class.calls
    kwargs, loaded = call["kwargs"], optimizer.loaded
    assert loaded is not None
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"]) == (True, 0.6, 0.9)
    assert kwargs["max_new_tokens"] == 24
    assert kwargs["eos_token_id"] == [loaded.tokenizer.eos_token_id]
    assert "bad_words_ids" not in kwargs
    assert not any(isinstance(p, RowMinNewTokens) for p in kwargs["logits_processor"])
    assert call["sequences"].shape[1] - call["prompt_length"] <= 24


async def test_aggressive_mode_settings_reach_generate(recorded: tuple[HFOptimizer, Any]) -> None:
    optimizer, model_class = recorded
    loaded = optimizer.loaded
    assert loaded is not None
    await optimizer.optimize("Tell me about black holes.", "aggressive")
    (call,) = model_class.calls
    kwargs = call["kwargs"]
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"]) == (True, 0.9, 0.9)
    assert set(kwargs["eos_token_id"]) == {loaded.tokenizer.eos_token_id, *loaded.newline_ids}
    assert loaded.newline_ids and all("\n" in loaded.tokenizer.decode([i]) for i in loaded.newline_ids)
    decoded = {loaded.tokenizer.decode(ids).strip() for ids in kwargs["bad_words_ids"]}
    assert decoded == set(BANNED_STRINGS)
    (minimum,) = [p for p in kwargs["logits_processor"] if isinstance(p, RowMinNewTokens)]
    # The reference counts the prompt as the tokenizer encodes it, BOS included: one more than the bare text.
    with_bos = len(loaded.tokenizer("Tell me about black holes.").input_ids)
    assert with_bos == len(loaded.tokenizer("Tell me about black holes.", add_special_tokens=False).input_ids) + 1
    assert minimum.minimums.tolist() == [with_bos + 5]


def favour_token(token_id: int) -> Callable[[Any, Any], None]:
    def bias(logits: Any, config: Any) -> None:
        logits[..., token_id] += 50.0

    return bias


async def test_aggressive_forces_prompt_length_plus_five_then_stops_at_newline(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    model_class = recording_class(favour_token(newline))
    options = replace(OPTIONS, max_new_tokens=40)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    try:
        texts = ["Tell me a joke.", "Give me 3 tips for better sleep tonight."]
        aggressive = await asyncio.gather(*(optimizer.optimize(t, "aggressive") for t in texts))
        stable = await optimizer.optimize(texts[0], "stable")
    finally:
        await optimizer.close()
    aggressive_call, stable_call = model_class.calls
    generated = aggressive_call["sequences"][:, aggressive_call["prompt_length"]:]
    for row, text in enumerate(texts):
        minimum = len(tokenizer(text).input_ids) + 5
        tokens = generated[row].tolist()
        # A model that always wants a newline is held off until the minimum, then stops on the newline.
        assert newline not in tokens[:minimum]
        assert tokens[minimum] == newline
        assert "\n" not in aggressive[row].text and aggressive[row].text
    # Stable mode neither forces a length nor stops at newlines: the model's newlines fill the budget.
    stable_tokens = stable_call["sequences"][0, stable_call["prompt_length"]:].tolist()
    assert stable_tokens == [newline] * 40 and stable.text == "" and stable.truncated


async def test_concurrent_requests_are_generated_together(tiny_model_dir: Path) -> None:
    sizes: list[int] = []
    model_class = recording_class()
    options = replace(OPTIONS, max_batch_size=4, max_wait_ms=200, on_batch=sizes.append)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    try:
        modes = ["stable", "aggressive"] * 5
        rewrites = await asyncio.gather(*(optimizer.optimize(f"prompt {i}", m)  # type: ignore[arg-type]
                                          for i, m in enumerate(modes)))
    finally:
        await optimizer.close()
    assert sum(sizes) == 10 and max(sizes) > 1 and max(sizes) <= 4
    # Each rewrite tells the size of the batch it ran in (the optimizer span's bpo.optimizer.batch_size).
    assert sorted(rewrite.batch_size or 0 for rewrite in rewrites) == sorted(size for size in sizes
                                                                            for _ in range(size))
    # Each generate call holds one mode: its decoding settings are the batch's.
    for call in model_class.calls:
        rows = call["sequences"].shape[0]
        assert rows <= 4 and call["kwargs"]["temperature"] in (0.6, 0.9)
    assert [call["sequences"].shape[0] for call in model_class.calls] == sizes


async def test_seeded_rewrites_do_not_depend_on_batch_mates(tiny_model_dir: Path) -> None:
    options = replace(OPTIONS, seed=1234)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options))
    try:
        alone = await optimizer.optimize("Tell me about black holes.", "stable")
        batched = await asyncio.gather(*(optimizer.optimize(t, "stable") for t in
                                         ["Write a poem.", "Tell me about black holes.", "Explain recursion."]))
        other_seed = HFOptimizer(str(tiny_model_dir), replace(options, seed=99))
        await ready(other_seed)
        different = await other_seed.optimize("Tell me about black holes.", "stable")
        await other_seed.close()
    finally:
        await optimizer.close()
    assert batched[1].text == alone.text
    assert different.text != alone.text


async def test_cancelled_request_stops_generating(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    endless = [True]

    def steer_eos(logits: Any, config: Any) -> None:
        # First an endless generation; once it is abandoned, one that ends at once.
        logits[..., eos] = -float("inf") if endless[0] else 100.0

    model_class = recording_class(steer_eos)
    options = replace(OPTIONS, max_new_tokens=900)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    try:
        with pytest.raises(asyncio.TimeoutError):
            # Long enough that its own budget is the whole 900 (6x its tokens): only cancellation can end it early.
            await asyncio.wait_for(optimizer.optimize(" ".join(["a long one"] * 60), "stable"), 0.3)
        for _ in range(1000):
            if model_class.calls:
                break
            await asyncio.sleep(0.01)
        (call,) = model_class.calls
        assert call["sequences"].shape[1] - call["prompt_length"] < 900
        endless[0] = False
        assert (await optimizer.optimize("next", "stable")).text == ""
    finally:
        await optimizer.close()


async def test_unloadable_model_fails_with_a_clear_message(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    optimizer = HFOptimizer(str(broken), OPTIONS)
    await optimizer.start()
    status = await optimizer.wait_loaded()
    assert status.state == "failed"
    assert status.detail.startswith(f"cannot load hf:{broken}")
    assert status.optimizer == optimizer.identity == f"hf:{broken}@failed"  # not "pending" once it failed
    with pytest.raises(OptimizerUnavailable, match="cannot load"):
        await optimizer.optimize("hi", "stable")
    await optimizer.close()


async def test_a_path_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    optimizer = HFOptimizer(str(tmp_path / "no" / "such-model"), OPTIONS)
    await optimizer.start()
    status = await optimizer.wait_loaded()
    assert status.state == "failed" and "no such directory" in status.detail
    assert "hub" not in status.detail.split("(")[0]  # not a hub failure: nothing was asked of the hub


async def test_hub_hint_is_true_when_the_hub_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the library's switch: no network is touched
    optimizer = HFOptimizer("bpo-tests/not-in-the-cache", OPTIONS)
    await optimizer.start()
    status = await optimizer.wait_loaded()
    assert status.state == "failed"
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in status.detail
    assert "HF_HUB_OFFLINE=1" not in status.detail  # never advise what is already done


async def test_missing_torch_or_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_model_dir: Path) -> None:
    # An interpreter without the [gpu] extra: importing transformers fails.
    monkeypatch.setitem(sys.modules, "transformers", None)
    optimizer = HFOptimizer(str(tiny_model_dir), OPTIONS)
    await optimizer.start()
    status = await optimizer.wait_loaded()
    await optimizer.close()
    assert status.state == "failed"
    assert "transformers is missing" in status.detail
    assert "pip install 'bpo-proxy[gpu]'" in status.detail


def test_banned_word_ids_cover_both_word_positions(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    decoded = [tokenizer.decode(ids) for ids in banned_word_ids(tokenizer)]
    assert set(decoded) == {*BANNED_STRINGS, *(" " + s for s in BANNED_STRINGS)}


def steer_eos(eos: int, end: bool) -> Callable[[Any, Any], None]:
    """Make the random model end at once (``end``) or never."""
    def bias(logits: Any, config: Any) -> None:
        logits[..., eos] = 100.0 if end else -float("inf")

    return bias


async def test_a_rewrite_cut_at_its_budget_is_marked_truncated(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    results = {}
    for end in (False, True):
        model_class = recording_class(steer_eos(eos, end))
        optimizer = await ready(HFOptimizer(str(tiny_model_dir), OPTIONS, loader=loader_for(model_class)))
        try:
            results[end] = await optimizer.optimize("Tell me about black holes.", "stable")
        finally:
            await optimizer.close()
    assert results[False].truncated and results[False].text  # 24 tokens of text, but cut: never to be used
    assert not results[True].truncated


async def test_each_row_gets_a_budget_sized_from_its_prompt(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model_class = recording_class(steer_eos(tokenizer.eos_token_id, end=False))
    options = replace(OPTIONS, max_new_tokens=400, max_wait_ms=300)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    texts = ["Hi.", " ".join(["Tell me about black holes and the stars around them."] * 3)]
    try:
        rewrites = await asyncio.gather(*(optimizer.optimize(t, "stable") for t in texts))
    finally:
        await optimizer.close()
    budgets = [token_budget(len(tokenizer(t).input_ids), 400) for t in texts]
    assert budgets[0] == MIN_BUDGET_TOKENS < budgets[1] <= 400  # 6x a long prompt, the floor for a short one
    assert all(r.truncated for r in rewrites)
    (call,) = model_class.calls
    assert call["kwargs"]["max_new_tokens"] == budgets[1]
    generated = call["sequences"][:, call["prompt_length"]:].tolist()
    # The short row stopped at its own budget: padding after it while the long row went on to its own.
    assert set(generated[0][budgets[0]:]) == {tokenizer.pad_token_id}
    assert len(generated[1]) == budgets[1] and tokenizer.pad_token_id not in generated[1][budgets[0]:budgets[0] + 8]


async def test_aggressive_prompt_whose_minimum_exceeds_the_cap_is_not_generated(tiny_model_dir: Path) -> None:
    model_class = recording_class()
    options = replace(OPTIONS, max_new_tokens=8)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    try:
        # Before: the minimum was capped at the budget, so every long aggressive prompt came back cut.
        rewrite = await optimizer.optimize("Summarise the history of the Roman Empire in detail.", "aggressive")
    finally:
        await optimizer.close()
    assert rewrite.truncated and rewrite.text == "" and model_class.calls == []


def test_seeded_sampler_keeps_the_top_k_unseeded_generate_uses() -> None:
    from transformers import GenerationConfig

    # transformers 5 leaves top_k unset in a model's config and applies 50 inside generate().
    assert effective_top_k(GenerationConfig()) == 50
    assert effective_top_k(GenerationConfig(top_k=7)) == 7
    assert effective_top_k(GenerationConfig(top_k=0)) is None


async def test_seeded_generate_samples_with_top_k(tiny_model_dir: Path) -> None:
    from transformers import TopKLogitsWarper

    model_class = recording_class()
    options = replace(OPTIONS, seed=7)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), options, loader=loader_for(model_class)))
    try:
        await optimizer.optimize("Tell me about black holes.", "stable")
    finally:
        await optimizer.close()
    (sampler,) = [p for p in model_class.calls[0]["kwargs"]["logits_processor"] if isinstance(p, SeededRowSampler)]
    (top_k,) = [w for w in sampler.warpers if isinstance(w, TopKLogitsWarper)]
    assert top_k.top_k == 50


def test_model_source_reads_gguf_files_dirs_and_hub_ids(tmp_path: Path) -> None:
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_source(str(gguf)) == (str(tmp_path), "m.Q4_1.gguf")
    assert model_source(str(tmp_path)) == (str(tmp_path), None)
    assert model_source("owner/repo-GGUF/sub/m.gguf") == ("owner/repo-GGUF", "sub/m.gguf")
    assert model_source("THUDM/BPO") == ("THUDM/BPO", None)


async def test_speed_is_measured_at_start_and_a_short_deadline_is_reported(tiny_model_dir: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    options = replace(OPTIONS, request_timeout=1e-6, measure_speed=True)
    with caplog.at_level("WARNING", logger="bpo.optimizer.hf"):
        optimizer = await ready(HFOptimizer(str(tiny_model_dir), options))
    try:
        speed = optimizer.status().speed
        assert speed is not None and speed["tokens_per_second"] > 0 and speed["deadline_too_short"] is True
        assert "tokens/s" in optimizer.status().detail and "over the 1e-06 s deadline" in optimizer.status().detail
        (warning,) = [r for r in caplog.records if "deadline" in r.getMessage()]
        assert "below what cpu can do" in warning.getMessage()
        # The queue cannot finish within the deadline: refused at once, nothing generated.
        with pytest.raises(OptimizerBusy, match="deadline"):
            await optimizer.optimize("Tell me about black holes.", "stable")
    finally:
        await optimizer.close()


async def test_busy_fails_open_at_once_through_the_pipeline(tiny_model_dir: Path) -> None:
    from optimizer.cache import LocalTier, MemoryCache
    from optimizer.pipeline import RewritePipeline

    optimizer = await ready(HFOptimizer(str(tiny_model_dir), replace(OPTIONS, request_timeout=1e-6,
                                                                      measure_speed=True)))
    pipeline = RewritePipeline(optimizer, MemoryCache(LocalTier(10, 1 << 20, 60)), timeout=30.0, max_chars=8000)
    try:
        outcome = await pipeline.run("Tell me about black holes.", "stable")
    finally:
        await optimizer.close()
    assert (outcome.applied, outcome.reason, outcome.text) == (False, "busy", "Tell me about black holes.")


async def test_batch_size_zero_means_by_device(tiny_model_dir: Path) -> None:
    assert (default_batch_size("cpu"), default_batch_size("cuda:0"), default_batch_size("mps")) == (1, 8, 8)
    optimizer = await ready(HFOptimizer(str(tiny_model_dir), replace(OPTIONS, max_batch_size=0)))
    try:
        assert optimizer._batcher is not None and optimizer._batcher.max_batch_size == 1  # measured on CPU
    finally:
        await optimizer.close()
