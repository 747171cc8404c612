"""The training subcommands as ``bpo`` exposes them: interface flags, fast help, real runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.training.fake_models import critic
from training.build import BuildConfig
from training.cli import config_from_args, describe_error, register
from training.errors import DataError
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


def user_error(tmp_path: Path, case: str) -> tuple[str, list[str], str]:
    """(command, arguments, text the message must hold) for each kind of mistake a user makes."""
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a"},\n', encoding="utf-8")  # an array cut off mid-way
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "optimized_prompt": "b"}\n', encoding="utf-8")
    missing, out, quiet = str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"), "--no-progress"
    empty_dir = tmp_path / "empty-model"
    empty_dir.mkdir()
    return {
        "build-broken-json": ("data build", ["--input", str(broken), "--output", out, "--critic-model", "m", quiet],
                              f"{broken}: not a valid JSON array"),
        "build-missing-input": ("data build", ["--input", missing, "--output", out, "--critic-model", "m", quiet],
                                f"{missing}: no such file"),
        "iterate-missing-input": ("data iterate", ["--input", missing, "--output", out, "--optimizer",
                                                   "remote:http://127.0.0.1:9/v1", quiet],
                                  f"{missing}: No such file or directory"),
        "eval-broken-json": ("eval", ["--prompts", str(broken), "--optimizer", "remote:http://127.0.0.1:9/v1",
                                      "--offline", quiet], f"{broken}: not a valid JSON array"),
        "train-missing-data": ("train", ["--base", str(empty_dir), "--data", missing, "--output", out],
                               f"{missing}: No such file or directory"),
        "train-bad-base": ("train", ["--base", str(tmp_path / "no-such-model"), "--data", str(pairs), "--output",
                                     out], f"--base {tmp_path / 'no-such-model'}: cannot load its tokenizer"),
        "train-base-without-model": ("train", ["--base", str(empty_dir), "--data", str(pairs), "--output", out],
                                     f"--base {empty_dir}: cannot load its tokenizer"),
    }[case]


@pytest.mark.parametrize("case", ["build-broken-json", "build-missing-input", "iterate-missing-input",
                                  "eval-broken-json", "train-missing-data", "train-bad-base",
                                  "train-base-without-model"])
def test_user_errors_are_one_line_on_stderr_and_exit_2(tmp_path: Path, case: str) -> None:
    command, arguments, expected = user_error(tmp_path, case)
    # Offline hub: a wrong --base must fail on the spot, never wait on the network.
    result = subprocess.run([sys.executable, "-m", "proxy.cli", *command.split(), *arguments],
                            env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bpo {command}: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_one_line_names_the_file_of_an_os_error() -> None:
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/d/x.jsonl")) == (
        "/d/x.jsonl: No such file or directory")
    assert describe_error(DataError("bad\n  record")) == "bad record"
