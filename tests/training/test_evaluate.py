"""``bpo eval`` end to end: the fake upstream is optimizer (/v1/completions), target and judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream, default_rewrite
from tests.training.fake_models import by_model, cue_judge, fixed_judge, judge_answers
from training.cli import main
from training.records import read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"
SETS = [FIXTURES / "vicuna_like.jsonl", FIXTURES / "dolly_like.json", FIXTURES / "self_instruct_like.json"]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def evaluate(upstream: FakeUpstream, output: Path, *extra: str, sets: list[Path] = SETS) -> int:
    prompts = [arg for path in sets for arg in ("--prompts", str(path))]
    return main(["eval", *prompts, "--optimizer", f"remote:{upstream.base_url}", "--target-model", "fake-model",
                 "--target-base-url", upstream.base_url, "--judge-model", "fake-judge", "--judge-base-url",
                 upstream.base_url, "--output", str(output), "--no-progress", "--retry-backoff", "0.01", *extra])


def summary_of(output: Path) -> dict[str, Any]:
    return dict(json.loads(output.with_suffix(".summary.json").read_text()))


def test_eval_judges_both_orders_per_set_and_resumes(upstream: FakeUpstream, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    upstream.responders[CHAT] = by_model({"fake-judge": cue_judge()})
    output, plot = tmp_path / "results.jsonl", tmp_path / "wtl.png"
    assert evaluate(upstream, output, "--plot", str(plot)) == 0

    summary = summary_of(output)
    assert {name: (s["win"], s["tie"], s["loss"]) for name, s in summary["sets"].items()} == {
        "vicuna_like": (3, 0, 0), "dolly_like": (2, 0, 0), "self_instruct_like": (2, 0, 0)}
    assert summary["average_delta_wr"] == 100.0
    assert summary["sets"]["dolly_like"]["copy_rate"] == 0.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "vicuna_like" in printed and "+100.0" in printed

    results = read_records(output)
    dolly = next(r for r in results if r["set"] == "dolly_like" and r["id"] == "0")
    prompt = "Who wrote the novel?\nMoby-Dick is an 1851 novel by the American writer Herman Melville."
    assert dolly["prompt"] == prompt and dolly["optimized_prompt"] == default_rewrite(prompt)
    assert dolly["verdicts"] == ["B", "A"] and dolly["outcome"] == "win"

    chats = [r.json for r in upstream.requests_to(CHAT)]
    targets = [c for c in chats if c["model"] == "fake-model"]
    judges = [c for c in chats if c["model"] == "fake-judge"]
    assert len(targets) == 14 and len(judges) == 14 and len(upstream.requests_to(COMPLETIONS)) == 7
    # Each prompt is judged twice, the optimized prompt's answer once as A and once as B.
    optimized_answer = "echo: " + default_rewrite(prompt)
    positions = sorted(letter for j in judges for letter, text in judge_answers(j).items()
                       if text == optimized_answer)
    assert positions == ["A", "B"]

    upstream.clear()
    upstream.responders[CHAT] = by_model({"fake-judge": cue_judge()})
    assert evaluate(upstream, output) == 0
    assert upstream.requests_to(CHAT) == [] and upstream.requests_to(COMPLETIONS) == []
    assert summary_of(output)["sets"] == summary["sets"]
    assert len(read_records(output)) == 7


def test_target_and_judge_keys_are_used_but_never_written_to_disk(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.responders[CHAT] = by_model({"fake-judge": cue_judge()})
    output = tmp_path / "out" / "results.jsonl"
    target_key, judge_key = "sk-target-7d2a-do-not-store", "sk-judge-91bc-do-not-store"
    assert evaluate(upstream, output, "--limit", "1", "--target-api-key", target_key, "--judge-api-key", judge_key,
                    "--plot", str(tmp_path / "out" / "wtl.png"), sets=[SETS[0]]) == 0
    keys = {r.json["model"]: r.headers["authorization"] for r in upstream.requests_to(CHAT)}
    assert keys == {"fake-model": f"Bearer {target_key}", "fake-judge": f"Bearer {judge_key}"}
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) >= 3  # results, summary, plot
    assert [p for p in written if target_key.encode() in p.read_bytes() or judge_key.encode() in p.read_bytes()] == []
    config = summary_of(output)["config"]
    assert (config["target_api_key"], config["judge_api_key"]) == ("<redacted>", "<redacted>")
    assert config["target_max_tokens"] == 1024  # a token count is not a secret


def test_a_judge_biased_to_the_first_position_yields_ties(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.responders[CHAT] = by_model({"fake-judge": fixed_judge("The first one.\n[[A]]")})
    output = tmp_path / "results.jsonl"
    assert evaluate(upstream, output, sets=[SETS[0]]) == 0
    sets = summary_of(output)["sets"]
    assert (sets["vicuna_like"]["tie"], sets["vicuna_like"]["delta_wr"]) == (3, 0.0)


def test_unreadable_verdicts_are_counted_apart(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.responders[CHAT] = by_model({"fake-judge": fixed_judge("Both have merits.")})
    output = tmp_path / "results.jsonl"
    assert evaluate(upstream, output, "--limit", "2", sets=[SETS[0]]) == 0
    vicuna = summary_of(output)["sets"]["vicuna_like"]
    assert (vicuna["invalid"], vicuna["judged"], vicuna["delta_wr"]) == (2, 0, 0.0)


def test_offline_mode_rewrites_without_target_or_judge(upstream: FakeUpstream, tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    code = main(["eval", "--prompts", str(SETS[1]), "--optimizer", f"remote:{upstream.base_url}", "--offline",
                 "--output", str(output), "--no-progress", "--limit", "1"])
    assert code == 0
    assert upstream.requests_to(CHAT) == [] and len(upstream.requests_to(COMPLETIONS)) == 1
    dolly = summary_of(output)["sets"]["dolly_like"]
    assert dolly["count"] == 1 and dolly["judged"] == 0 and dolly["guard_pass_rate"] == 1.0
    assert dolly["length_ratio"] == pytest.approx(26 / 15)  # 15 words + the fake's 11


def test_context_append_and_rounds_feed_the_optimizer_what_they_say(upstream: FakeUpstream, tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    code = main(["eval", "--prompts", str(SETS[1]), "--optimizer", f"remote:{upstream.base_url}", "--offline",
                 "--output", str(output), "--no-progress", "--limit", "1", "--context", "append",
                 "--rounds", "2"])
    assert code == 0
    sent = [r.json["prompt"] for r in upstream.requests_to(COMPLETIONS)]
    once = default_rewrite("Who wrote the novel?")
    assert "Who wrote the novel? [/INST]" in sent[0] and "Moby-Dick" not in sent[0]
    assert f"{once} [/INST]" in sent[1]
    result = read_records(output)[0]
    assert result["rounds"] == [once, default_rewrite(once)]
    assert result["optimized_prompt"] == default_rewrite(once) + "\nMoby-Dick is an 1851 novel by the American " \
                                                                  "writer Herman Melville."


def test_missing_target_and_judge_fail_with_one_line(upstream: FakeUpstream, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--prompts", str(SETS[0]), "--optimizer", f"remote:{upstream.base_url}"])
    assert code == 2
    assert "--target-model and --judge-model are required" in capsys.readouterr().err
    assert upstream.requests_to(COMPLETIONS) == []
