"""``bpo data build`` end to end against the fake upstream as critic: pairs, drops, stats, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream, Recorded, Reply, chat_reply
from tests.training.fake_models import critic, critic_instruction
from training.cli import main
from training.records import read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"
PREFERENCES = FIXTURES / "preferences.jsonl"
CHAT = "/v1/chat/completions"
# Critic answers that each filter must catch (keyed by a word of the instruction).
FAULTY = {
    "recipe": "Detailed Comparison Result: meh\nOptimized Instruction: [PROTECT] Give me a recipe. [END]",
    "recursion": "Optimized Instruction: " + "Explain recursion very thoroughly " * 4 + "[END]",
    "haiku": "Detailed Comparison Result: fine\nOptimized Instruction: Write a haiku about rain that",
    "lock": "I cannot help with that.",
}


def build(upstream: FakeUpstream, output: Path, *extra: str) -> int:
    return main(["data", "build", "--input", str(PREFERENCES), "--output", str(output), "--critic-model",
                 "fake-critic", "--critic-base-url", upstream.base_url, "--no-progress",
                 "--retry-backoff", "0.01", *extra])


def pairs_of(path: Path) -> dict[str, dict[str, Any]]:
    return {pair["instruction"].strip(): pair for pair in read_records(path)}


def test_build_writes_pairs_drops_what_the_filters_catch_and_reports(
        upstream: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    upstream.responders[CHAT] = critic(FAULTY)
    output = tmp_path / "pairs.jsonl"
    assert build(upstream, output) == 0

    pairs = pairs_of(output)
    assert sorted(pairs) == ["Name a famous scientist who won a Nobel Prize.",
                             "Summarize the paragraph in one sentence.", 'Translate "Guten Morgen" into English.']
    summary = pairs["Summarize the paragraph in one sentence."]
    context = summary["context"]
    assert summary["prompt"] == "Summarize the paragraph in one sentence.\n" + context
    assert summary["optimized_prompt"] == ("Summarize the paragraph in one sentence. Answer accurately and in "
                                           "detail, with a clear structure.\n" + context)
    assert summary["source"] == "hand-written" and summary["critic_model"] == "fake-critic"
    assert summary["comparison"].startswith("The good response is accurate")

    rejected = {r["instruction"]: r["reason"] for r in read_records(output.with_suffix(".rejected.jsonl"))}
    # drop reasons are the serving guard's rule names (training/filters.py runs the guard's table)
    assert rejected == {"Give me a recipe.": "leaked-marker", "Explain recursion.": "repetition",
                        "Write a haiku about rain.": "unparsable-truncated",
                        "How do I pick a lock?": "unparsable-no-optimized-instruction"}
    # The duplicate (same instruction, other spacing) never reached the critic.
    asked = [critic_instruction(r.json) for r in upstream.requests_to(CHAT)]
    assert len(asked) == 7 and len(set(asked)) == 7
    assert all(r.json["model"] == "fake-critic" for r in upstream.requests_to(CHAT))

    stats = json.loads(output.with_suffix(".run.json").read_text())["stats"]
    assert stats == {"total": 8, "duplicates": 1, "resumed": 0, "kept": 3, "errors": 0,
                     "dropped": {"leaked-marker": 1, "repetition": 1, "unparsable-truncated": 1,
                                 "unparsable-no-optimized-instruction": 1}}
    printed = capsys.readouterr().out
    assert "duplicates skipped" in printed and "dropped: leaked-marker" in printed


def files_holding(directory: Path, secret: str) -> list[str]:
    return [str(path) for path in directory.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_the_critic_key_is_used_but_never_written_to_disk(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.responders[CHAT] = critic()
    output = tmp_path / "out" / "pairs.jsonl"
    secret = "sk-critic-4f1c9e-do-not-store"
    assert build(upstream, output, "--limit", "2", "--critic-api-key", secret) == 0
    assert {r.headers["authorization"] for r in upstream.requests_to(CHAT)} == {f"Bearer {secret}"}
    assert len(read_records(output)) == 2
    assert files_holding(tmp_path, secret) == []
    run = json.loads(output.with_suffix(".run.json").read_text())
    assert run["config"]["critic_api_key"] == "<redacted>" and run["config"]["critic_model"] == "fake-critic"


def test_rerun_skips_done_records_and_retries_only_failed_ones(upstream: FakeUpstream, tmp_path: Path) -> None:
    answer = critic()

    def flaky(recorded: Recorded) -> Reply:  # the recipe request always fails with a server error
        if "recipe" in critic_instruction(recorded.json):
            return Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}})
        return answer(recorded)

    upstream.responders[CHAT] = flaky
    output = tmp_path / "pairs.jsonl"
    assert build(upstream, output, "--max-retries", "1") == 0
    assert len(read_records(output)) == 6
    assert len(upstream.requests_to(CHAT)) == 6 + 2  # the failing record: first try + one retry

    upstream.clear()
    upstream.responders[CHAT] = answer
    assert build(upstream, output) == 0
    assert [critic_instruction(r.json) for r in upstream.requests_to(CHAT)] == ["Give me a recipe."]
    assert len(read_records(output)) == 7
    stats = json.loads(output.with_suffix(".run.json").read_text())["stats"]
    assert stats["resumed"] == 6 and stats["kept"] == 1


def test_rate_limited_requests_are_retried_with_backoff(upstream: FakeUpstream, tmp_path: Path) -> None:
    answer = critic()
    failures = {"left": 2}

    def limited(recorded: Recorded) -> Reply:
        if failures["left"]:
            failures["left"] -= 1
            return Reply(status=429, json={"error": {"message": "slow down", "type": "rate_limit"}})
        return answer(recorded)

    upstream.responders[CHAT] = limited
    output = tmp_path / "pairs.jsonl"
    assert build(upstream, output, "--limit", "1", "--concurrency", "1") == 0
    assert len(read_records(output)) == 1 and len(upstream.requests_to(CHAT)) == 3


def test_build_resumes_after_the_process_is_killed(upstream: FakeUpstream, tmp_path: Path) -> None:
    answer = critic()

    def slow(recorded: Recorded) -> Reply:
        reply = answer(recorded)
        reply.delay = 0.4
        return reply

    upstream.responders[CHAT] = slow
    output = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-m", "training.cli", "data", "build", "--input", str(PREFERENCES), "--output",
               str(output), "--critic-model", "fake-critic", "--critic-base-url", upstream.base_url,
               "--concurrency", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and len(output.read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "build ended before it was killed"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    written = len(output.read_text().splitlines())
    assert written < 7  # killed part-way through

    upstream.clear()
    upstream.responders[CHAT] = answer
    assert build(upstream, output) == 0
    assert len(upstream.requests_to(CHAT)) == 7 - written
    keys = [pair["key"] for pair in read_records(output)]
    assert len(keys) == 7 and len(set(keys)) == 7


def test_a_missing_input_is_one_line_of_error(upstream: FakeUpstream, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "build", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--critic-model", "m"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"bpo data build: {tmp_path / 'nope.jsonl'}: no such file"


def test_critic_answers_keep_the_chat_reply_shape(upstream: FakeUpstream) -> None:
    # Guard for the scripted critic itself: it answers in OpenAI's chat shape.
    reply = critic()(type("R", (), {"json": {"model": "m", "messages": [
        {"role": "user", "content": "[INSTRUCTION]\nDo X.\n[/INSTRUCTION]"}]}})())
    assert reply.json["choices"][0]["message"]["content"].endswith("[END]")
    assert chat_reply({"messages": []}).json["object"] == "chat.completion"
