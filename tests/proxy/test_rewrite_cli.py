"""``bpo rewrite`` through the real ``bpo`` entry point: remote and hf backends, failures, stdin."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxy.cli import main
from tests.fakes.upstream import FakeUpstream, free_port


def test_rewrite_prints_the_remote_optimizers_rewrite(
    upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "rewrite",
            "--optimizer",
            f"remote:{upstream.base_url}",
            "--model",
            "bpo-fake",
            "--mode",
            "aggressive",
            "--seed",
            "5",
            "-v",
            "Tell me about black holes.",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "Tell me about black holes. Please answer in detail, step by step, and explain your reasoning.\n"
    assert "optimizer: remote:bpo-fake@" in err and "guard: accepted" in err
    body = upstream.requests_to("/v1/completions")[0].json
    assert (body["temperature"], body["stop"], body["seed"]) == (0.9, ["\n"], 5)


def test_rewrite_reads_stdin_and_runs_the_hf_backend(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Explain recursion.\n"))
    runs = []
    for _ in range(2):
        code = main(
            [
                "rewrite",
                "--optimizer",
                f"hf:{tiny_model_dir}",
                "--mode",
                "aggressive",
                "--seed",
                "1",
                "--max-new-tokens",
                "12",
            ]
        )
        assert code == 0
        runs.append(capsys.readouterr().out)
        monkeypatch.setattr("sys.stdin", io.StringIO("Explain recursion.\n"))
    # Aggressive output is one line; a seed makes it reproducible.
    assert runs[0] == runs[1] and runs[0].count("\n") == 1


def test_unloadable_optimizer_exits_1_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["rewrite", "--optimizer", f"hf:{broken}", "hi"]) == 1
    assert "cannot load hf:" in capsys.readouterr().err
    assert main(["rewrite", "--optimizer", "none", "hi"]) == 1
    assert "--optimizer none rewrites nothing" in capsys.readouterr().err


def test_unreachable_remote_optimizer_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewrite", "--optimizer", f"remote:http://127.0.0.1:{free_port()}/v1", "hi"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("bpo rewrite: the optimizer remote:http://127.0.0.1:") and "unreachable" in error
    assert "retrying" not in error  # a one-shot command does not wait out the gateway's probing schedule


def test_bad_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewrite", "--optimizer", "bogus", "hi"]) == 2
    assert "--optimizer" in capsys.readouterr().err


def test_stdin_loses_the_trailing_line_break_echo_adds(
    upstream: FakeUpstream, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about black holes.\n"))
    code = main(["rewrite", "--optimizer", f"remote:{upstream.base_url}", "--model", "bpo-fake"])
    assert code == 0
    body = upstream.requests_to("/v1/completions")[0].json
    assert "Tell me about black holes. [/INST]" in body["prompt"]  # the prompt as typed, no "\n" before [/INST]
    assert capsys.readouterr().out.startswith("Tell me about black holes. Please answer")
