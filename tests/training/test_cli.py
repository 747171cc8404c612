"""The training subcommands as ``bpo`` exposes them: interface flags, fast help, real runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.fakes.upstream import FakeUpstream
from tests.training.fake_models import critic
from training.build import BuildConfig
from training.cli import config_from_args, register
from training.evaluate import EvalConfig
from training.records import read_records
from training.sft import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "training"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bpo")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_interface_command_lines_parse_into_stage_configs() -> None:
    build = config_from_args(parse(["data", "build", "--input", "p.jsonl", "--output", "o.jsonl", "--critic-model",
                                    "gpt-4o", "--critic-base-url", "http://h/v1"]), BuildConfig)
    assert (build.input, build.output, build.critic_model, build.critic_base_url) == (
        "p.jsonl", "o.jsonl", "gpt-4o", "http://h/v1")
    train = config_from_args(parse(["train", "--base", "B", "--data", "d.jsonl", "--output", "D", "--max-steps",
                                    "5", "--lora"]), TrainConfig)
    assert (train.base, train.max_steps, train.lora, train.bf16) == ("B", 5, True, None)
    evaluation = config_from_args(parse([
        "eval", "--prompts", "a.json", "--limit", "3", "--optimizer", "hf:D", "--target-model", "t",
        "--target-base-url", "http://t/v1", "--judge-model", "j", "--judge-base-url", "http://j/v1",
        "--prompts", "b.jsonl"]), EvalConfig)
    assert evaluation.prompts == ["a.json", "b.jsonl"] and evaluation.limit == 3
    assert (evaluation.target_base_url, evaluation.judge_model) == ("http://t/v1", "j")


def test_building_the_parser_imports_no_heavy_library() -> None:
    code = ("import sys, training.cli; training.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'litellm', 'datasets', 'matplotlib') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_bpo_entry_point_shows_the_training_commands() -> None:
    for command, flags in ((["data", "build"], ["--input", "--output", "--critic-model", "--critic-base-url"]),
                           (["data", "iterate"], ["--input", "--output", "--optimizer", "--rounds"]),
                           (["train"], ["--base", "--data", "--output", "--max-steps", "--lora"]),
                           (["eval"], ["--prompts", "--limit", "--optimizer", "--target-model", "--target-base-url",
                                       "--judge-model", "--judge-base-url", "--plot"])):
        result = subprocess.run([sys.executable, "-m", "proxy.cli", *command, "--help"], env=ENV,
                                capture_output=True, text=True, check=True)
        assert all(flag in result.stdout for flag in flags), (command, result.stdout)


def test_bpo_data_build_runs_through_the_entry_point(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.responders["/v1/chat/completions"] = critic()
    output = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "proxy.cli", "data", "build", "--input",
                    str(FIXTURES / "preferences.jsonl"), "--output", str(output), "--critic-model", "fake-critic",
                    "--critic-base-url", upstream.base_url, "--limit", "2", "--no-progress"],
                   env=ENV, capture_output=True, text=True, check=True)
    pairs = read_records(output)
    assert sorted(pair["instruction"] for pair in pairs) == ["Name a famous scientist who won a Nobel Prize.",
                                                             "Summarize the paragraph in one sentence."]
    assert len(upstream.requests_to("/v1/chat/completions")) == 2
