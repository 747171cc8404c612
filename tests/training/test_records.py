"""Record files: every shape the stages read, and the crash-safe appender that makes them resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import DataError
from training.records import JsonlAppender, PromptParts, prompt_parts, read_done, read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"


def test_prompt_files_of_every_shared_shape_load_as_they_are() -> None:
    vicuna = [prompt_parts(r) for r in read_records(FIXTURES / "vicuna_like.jsonl")]
    dolly = [prompt_parts(r) for r in read_records(FIXTURES / "dolly_like.json")]
    self_instruct = [prompt_parts(r) for r in read_records(FIXTURES / "self_instruct_like.json")]
    pairs = [prompt_parts(r) for r in read_records(FIXTURES / "pairs_like.json")]
    assert vicuna[0] == PromptParts("How can I sleep better?")
    assert dolly[0].text == "Who wrote the novel?\nMoby-Dick is an 1851 novel by the American writer Herman Melville."
    assert dolly[1].text == "Name three primary colors."
    assert self_instruct[1] == PromptParts("What is 12 times 12?")
    assert pairs[0].text == "Give two examples of good customer service."


def test_prompt_field_beats_instruction_and_alpaca_input_counts_as_context() -> None:
    assert prompt_parts({"prompt": " p ", "instruction": "i"}) == PromptParts("p")
    assert prompt_parts({"instruction": "Classify.", "input": "Dolphin"}).text == "Classify.\nDolphin"
    with pytest.raises(DataError, match="no prompt"):
        prompt_parts({"question": "?"})


def test_single_object_json_and_bad_jsonl_lines(tmp_path: Path) -> None:
    single = tmp_path / "one.json"
    single.write_text('{\n  "text": "hello"\n}\n')
    assert read_records(single) == [{"text": "hello"}]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2"):
        read_records(broken)


def test_a_malformed_or_mixed_json_array_is_a_data_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"},\n')
    with pytest.raises(DataError, match=r"cut\.json: not a valid JSON array \(.* line 2, column 1\)"):
        read_records(cut)
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        read_records(mixed)


def test_appender_cuts_a_torn_last_line_and_reading_ignores_it(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v"')
    assert [r["key"] for r in read_done(path)] == ["a"]
    with JsonlAppender(path) as out:
        out.write({"key": "c", "v": 3})
    assert path.read_text() == '{"key": "a", "v": 1}\n{"key": "c", "v": 3}\n'
