"""Loaders for the public preference datasets turn each format into our preference records."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import DataError
from training.sources import load_preferences

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"
SOURCES = FIXTURES / "sources"


def test_records_format_keeps_extra_fields_and_defaults_context() -> None:
    records = load_preferences(str(FIXTURES / "preferences.jsonl"))
    assert len(records) == 8
    assert records[0]["source"] == "hand-written" and records[0]["context"] == ""
    assert records[1]["context"].startswith("The city council")


def test_records_format_rejects_records_without_responses(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "good_res": "y"}\n')
    with pytest.raises(DataError, match="bad_res"):
        load_preferences(str(path))


def test_oasst1_pairs_the_best_and_worst_ranked_replies_of_first_prompts() -> None:
    records = load_preferences(str(SOURCES / "oasst1.jsonl"), "oasst1")
    assert records == [{"instruction": "What is a good name for a goldfish?", "context": "",
                        "good_res": "Bubbles, Goldie or Captain Fin are popular, playful choices.",
                        "bad_res": "Fish.", "source": "oasst1", "lang": "en", "message_id": "p1"}]


def test_hh_rlhf_keeps_single_turn_pairs_with_different_answers() -> None:
    records = load_preferences(str(SOURCES / "hh_rlhf.jsonl"), "hh-rlhf")
    assert [(r["instruction"], r["good_res"], r["bad_res"]) for r in records] == [
        ("How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it in cold water.",
         "Use water.")]


def test_chatbot_arena_keeps_decisive_single_turn_votes() -> None:
    records = load_preferences(str(SOURCES / "chatbot_arena.jsonl"), "chatbot-arena")
    assert len(records) == 1
    assert records[0]["good_res"].startswith("Saturn") and records[0]["bad_res"] == "Mars."
    assert (records[0]["good_model"], records[0]["bad_model"]) == ("alpaca-13b", "vicuna-13b")


def test_alpaca_gpt4_joins_gpt4_answers_with_the_original_alpaca_answers() -> None:
    records = load_preferences(str(SOURCES / "alpaca_gpt4.json"), "alpaca-gpt4", str(SOURCES / "alpaca.json"))
    assert [(r["instruction"], r["context"], r["bad_res"]) for r in records] == [
        ("Give three tips for staying healthy.", "", "Eat well."), ("Classify the animal.", "Dolphin", "Fish.")]


def test_alpaca_gpt4_needs_the_rejected_file_and_unknown_formats_fail() -> None:
    with pytest.raises(DataError, match="rejected-input"):
        load_preferences(str(SOURCES / "alpaca_gpt4.json"), "alpaca-gpt4")
    with pytest.raises(DataError, match="unknown input format"):
        load_preferences(str(FIXTURES / "preferences.jsonl"), "sharegpt")
    with pytest.raises(DataError, match="no such file"):
        load_preferences(str(FIXTURES / "missing.jsonl"))
