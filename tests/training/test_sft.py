"""``bpo train`` on the tiny random Llama: masking, loss, LoRA, the model dir the proxy loads, and an
overfit run that proves template, masking and decoding line up end to end."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optimizer.manifest import read_manifest
from tests.fakes.tiny_model import fixture_pairs
from training.cli import main
from training.records import write_jsonl
from training.sft import IGNORE_INDEX, TrainConfig, build_trainer, encode_pair, encode_prompt, prepare

# Real (tiny) models train here.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight of the fixture pairs the tiny tokenizer was trained on."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(path, fixture_pairs()[:8])
    return path


@pytest.fixture(scope="module")
def overfit_dir(tiny_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 60 steps on 8 pairs at a high learning rate: enough to memorise them."""
    output = tmp_path_factory.mktemp("overfit") / "bpo-tiny"
    code = main(["train", "--base", str(tiny_model_dir), "--data", str(pairs_file), "--output", str(output),
                 "--max-steps", "60", "--learning-rate", "1e-2", "--batch-size", "8", "--logging-steps", "10"])
    assert code == 0
    return output


def test_collated_labels_mask_the_prompt_and_padding(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    config = TrainConfig(base=str(tiny_model_dir), data=str(pairs_file), output=str(tmp_path / "out"))
    prepared = prepare(config)
    trainer = build_trainer(config, prepared)
    tokenizer = prepared.tokenizer
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    pairs = {json.dumps(encode_prompt(tokenizer, p["prompt"])): p for p in fixture_pairs()[:8]}
    for row, (input_ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        length = len(rows[row]["input_ids"])
        prompt_length = next(n for n in range(length) if labels[n] != IGNORE_INDEX)
        prompt_ids = input_ids[:prompt_length].tolist()
        pair = pairs[json.dumps(prompt_ids)]  # the masked part is exactly the templated prompt
        assert prompt_ids[0] == tokenizer.bos_token_id
        assert (labels[prompt_length:length] == input_ids[prompt_length:length]).all()
        assert labels[length - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[prompt_length:length - 1]) == pair["optimized_prompt"]
        assert (labels[length:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, length:] == 0).all()


def test_long_pairs_are_dropped_whole_never_truncated(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = [*fixture_pairs()[:6], {"prompt": "Summarise: " + "the cat sat on the mat. " * 60,
                                    "optimized_prompt": "Summarise the text in one sentence."}]
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, pairs)
    prepared = prepare(TrainConfig(base=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"),
                                   max_length=128))
    assert prepared.dropped_too_long == 1 and len(prepared.train) == 6
    for example in prepared.train:
        prompt_length = example["labels"].count(IGNORE_INDEX)
        decoded = prepared.tokenizer.decode(example["input_ids"][:prompt_length], skip_special_tokens=True)
        assert decoded.startswith("[INST] You are an expert prompt engineer.") and decoded.endswith("[/INST]")


def test_training_lowers_the_loss_changes_the_weights_and_writes_a_manifest(
        tiny_model_dir: Path, overfit_dir: Path, pairs_file: Path) -> None:
    manifest = read_manifest(overfit_dir)
    assert manifest is not None
    assert manifest.name == "bpo-tiny" and len(manifest.version) == 12
    assert manifest.base_model == str(tiny_model_dir) and manifest.template_version == "1"
    assert manifest.hyperparameters["learning_rate"] == 1e-2 and manifest.hyperparameters["max_steps"] == 60
    metrics = manifest.metrics
    assert metrics["steps"] == 60 and metrics["train_pairs"] == 8
    assert metrics["last_loss"] < metrics["first_loss"] / 4
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(overfit_dir / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    saved = json.loads((overfit_dir / "bpo_train_config.json").read_text())
    assert saved["config"]["data"] == str(pairs_file) and saved["metrics"]["steps"] == 60
    assert not (overfit_dir / "checkpoints").exists()


def test_the_overfit_model_reproduces_its_training_rewrites_through_the_hf_backend(overfit_dir: Path) -> None:
    from optimizer.base import OptimizerOptions
    from optimizer.registry import build_optimizer

    manifest = read_manifest(overfit_dir)
    assert manifest is not None
    pairs = fixture_pairs()[:8]

    async def rewrite_all() -> tuple[str, list[str]]:
        optimizer = build_optimizer(f"hf:{overfit_dir}", OptimizerOptions(seed=7, max_new_tokens=64))
        await optimizer.start()
        while optimizer.status().state == "loading":
            await asyncio.sleep(0.05)
        try:
            rewrites = await asyncio.gather(*(optimizer.optimize(p["prompt"], "stable") for p in pairs))
            return optimizer.identity, [r.text for r in rewrites]
        finally:
            await optimizer.close()

    identity, rewrites = asyncio.run(rewrite_all())
    assert identity.endswith(f"{manifest.name}@{manifest.version}")
    assert rewrites == [p["optimized_prompt"] for p in pairs]


def test_served_decoding_reproduces_every_training_rewrite(overfit_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.sft import served_rewrites

    pairs = fixture_pairs()[:8]
    model = AutoModelForCausalLM.from_pretrained(overfit_dir)
    tokenizer = AutoTokenizer.from_pretrained(overfit_dir)
    rewrites = served_rewrites(model, tokenizer, [p["prompt"] for p in pairs], seed=7)
    assert rewrites == [p["optimized_prompt"] for p in pairs]
    # Prompts it never saw do not come back as a training rewrite verbatim.
    unseen = served_rewrites(model, tokenizer, [fixture_pairs()[20]["prompt"]], seed=7)
    assert unseen[0] != fixture_pairs()[20]["optimized_prompt"]


def test_lora_training_merges_adapters_and_reports_held_out_metrics(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, fixture_pairs()[:12])
    output = tmp_path / "lora"
    code = main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--output", str(output), "--lora",
                 "--lora-rank", "4", "--max-steps", "6", "--learning-rate", "5e-3", "--batch-size", "4",
                 "--eval-fraction", "0.25", "--eval-generate", "2", "--logging-steps", "2", "--name", "tiny-lora"])
    assert code == 0
    assert not (output / "adapter_config.json").exists()  # merged: a plain causal-LM dir
    merged = load_file(output / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert not any("lora" in key for key in merged)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    manifest = read_manifest(output)
    assert manifest is not None and manifest.name == "tiny-lora" and manifest.hyperparameters["lora"] is True
    metrics = manifest.metrics
    assert metrics["train_pairs"] == 9 and metrics["held_out_pairs"] == 3
    assert metrics["eval_loss"] > 0 and metrics["heldout_count"] == 2
    assert 0.0 <= metrics["heldout_copy_rate"] <= 1.0 and "heldout_reference_similarity" in metrics
    # the held-out loss is compared with the base model's, measured on the same pairs before training
    assert metrics["base_eval_loss"] > 0 and metrics["base_eval_loss"] != metrics["eval_loss"]
    held_out = [json.loads(line) for line in (output / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 3 and {p["prompt"] for p in held_out} <= {p["prompt"] for p in fixture_pairs()[:12]}
    assert held_out[0].keys() == {"prompt", "optimized_prompt"}


def test_summary_line_reports_smoothed_train_loss_and_held_out_loss_against_the_base(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, fixture_pairs()[:12])
    output = tmp_path / "out"
    code = main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--output", str(output),
                 "--max-steps", "8", "--learning-rate", "5e-3", "--batch-size", "4", "--logging-steps", "1",
                 "--eval-fraction", "0.25", "--eval-generate", "0"])
    assert code == 0
    metrics = json.loads((output / "bpo_train_config.json").read_text())["metrics"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (f"train loss {metrics['train_loss_start']:.3f} -> {metrics['train_loss_end']:.3f}" in line
            and f"held-out loss {metrics['base_eval_loss']:.3f} (base) -> {metrics['eval_loss']:.3f} on 3 pairs"
            in line)


def test_saved_files_are_readable_by_other_users(overfit_dir: Path) -> None:
    modes = {path.name: path.stat().st_mode & 0o777 for path in overfit_dir.iterdir() if path.is_file()}
    assert modes["model.safetensors"] & 0o044 == 0o044, modes
    assert all(mode & 0o004 for mode in modes.values()), modes


def test_the_bpo_release_pairs_train_as_they_are(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Records as in the BPO release's pairs.json (final_input / final_output beside the raw fields)."""
    release = [{"instruction": p["prompt"], "context": "", "good_res": "An answer.", "bad_res": "No.",
                "final_input": p["prompt"], "final_output": p["optimized_prompt"]} for p in fixture_pairs()[:6]]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(release))
    prepared = prepare(TrainConfig(base=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o")))
    assert len(prepared.train) == 6
    encoded = {json.dumps(example["input_ids"]) for example in prepared.train}
    expected = encode_pair(prepared.tokenizer, release[0]["final_input"], release[0]["final_output"])
    assert json.dumps(expected["input_ids"]) in encoded


def test_bad_training_input_is_one_line_of_error(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "only a prompt"}\n')
    code = main(["train", "--base", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "pair 1 needs string prompt and optimized_prompt fields (or final_input and final_output" in (
        capsys.readouterr().err)


def test_the_gpu_settings_bf16_and_activation_checkpointing_also_run_on_cpu(
        tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "bf16"
    code = main(["train", "--base", str(tiny_model_dir), "--data", str(pairs_file), "--output", str(output),
                 "--max-steps", "2", "--batch-size", "4", "--bf16", "--gradient-checkpointing", "--lora",
                 "--logging-steps", "1"])
    assert code == 0
    manifest = read_manifest(output)
    assert manifest is not None
    assert manifest.hyperparameters["bf16"] is True and manifest.hyperparameters["gradient_checkpointing"] is True
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    assert manifest.metrics["steps"] == 2 and math.isfinite(manifest.metrics["last_loss"])
