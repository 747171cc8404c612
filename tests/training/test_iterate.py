"""``bpo data iterate``: each round optimizes the previous round's output; re-runs skip done prompts."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.upstream import FakeUpstream, default_rewrite
from training.cli import main
from training.records import read_records

VICUNA = Path(__file__).resolve().parents[1] / "fixtures" / "training" / "vicuna_like.jsonl"


def iterate(upstream: FakeUpstream, output: Path, *extra: str) -> int:
    return main(["data", "iterate", "--input", str(VICUNA), "--output", str(output), "--optimizer",
                 f"remote:{upstream.base_url}", "--no-progress", *extra])


def test_rounds_chain_and_rerun_resumes(upstream: FakeUpstream, tmp_path: Path) -> None:
    output = tmp_path / "iterated.jsonl"
    assert iterate(upstream, output, "--rounds", "3", "--limit", "2") == 0
    records = read_records(output)
    assert len(records) == 2 and len(upstream.requests_to("/v1/completions")) == 6
    first = next(r for r in records if r["prompt"] == "How can I sleep better?")
    one = default_rewrite("How can I sleep better?")
    assert first["rounds"] == [one, default_rewrite(one), default_rewrite(default_rewrite(one))]
    assert first["optimized_prompt"] == first["rounds"][-1] and first["optimizer"].startswith("remote:")

    upstream.clear()
    assert iterate(upstream, output, "--rounds", "3") == 0
    assert len(upstream.requests_to("/v1/completions")) == 3  # only the third prompt, three rounds
    assert len(read_records(output)) == 3
