"""Loaders that turn public preference datasets into preference records (instruction, context, good, bad).

Each loader reads a local JSON/JSONL file, or the hub through ``datasets`` when given ``hf:DATASET_ID``
(``hf:DATASET_ID:SPLIT``). Only single-turn exchanges are kept: the optimizer rewrites one prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from training.records import DataError, Record, read_records

FORMATS = ("records", "oasst1", "hh-rlhf", "chatbot-arena", "alpaca-gpt4")


def read_rows(location: str) -> list[Record]:
    """Rows of a local file, or of a hub dataset named ``hf:ID`` / ``hf:ID:SPLIT`` (needs network)."""
    if location.startswith("hf:"):
        from datasets import load_dataset

        dataset_id, _, split = location[3:].partition(":")
        return [dict(row) for row in load_dataset(dataset_id, split=split or "train")]
    if not Path(location).exists():
        raise DataError(f"{location}: no such file")
    return read_records(location)


def from_records(rows: Iterable[Record]) -> list[Record]:
    """Our own preference format: checked, extra fields kept."""
    records = []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("instruction", "good_res", "bad_res") if not isinstance(row.get(key), str)]
        if missing:
            raise DataError(f"preference record {number} lacks {', '.join(missing)}")
        records.append({**row, "context": str(row.get("context") or "")})
    return records


def from_oasst1(rows: Iterable[Record]) -> list[Record]:
    """OASST1 message tables: an initial prompt with ranked replies gives (best reply, worst reply)."""
    rows = list(rows)
    replies: dict[str, list[Record]] = {}
    for row in rows:
        if row.get("role") == "assistant" and row.get("parent_id") and row.get("rank") is not None:
            replies.setdefault(row["parent_id"], []).append(row)
    records = []
    for row in rows:
        ranked = sorted(replies.get(str(row.get("message_id")), []), key=lambda reply: reply["rank"])
        if row.get("role") != "prompter" or row.get("parent_id") or len(ranked) < 2:
            continue
        records.append({"instruction": row["text"], "context": "", "good_res": ranked[0]["text"],
                        "bad_res": ranked[-1]["text"], "source": "oasst1", "lang": row.get("lang"),
                        "message_id": row["message_id"]})
    return records


def _hh_turns(text: str) -> list[tuple[str, str]]:
    turns = []
    for chunk in text.split("\n\nHuman: ")[1:] if "\n\nHuman: " in text else []:
        human, _, assistant = chunk.partition("\n\nAssistant: ")
        turns.append((human.strip(), assistant.strip()))
    return turns


def from_hh_rlhf(rows: Iterable[Record]) -> list[Record]:
    """Anthropic HH-RLHF ``chosen``/``rejected`` transcripts, single-turn only."""
    records = []
    for row in rows:
        chosen, rejected = _hh_turns(row.get("chosen", "")), _hh_turns(row.get("rejected", ""))
        if len(chosen) != 1 or len(rejected) != 1 or chosen[0][0] != rejected[0][0]:
            continue
        if not chosen[0][1] or not rejected[0][1] or chosen[0][1] == rejected[0][1]:
            continue
        records.append({"instruction": chosen[0][0], "context": "", "good_res": chosen[0][1],
                        "bad_res": rejected[0][1], "source": "hh-rlhf"})
    return records


def from_chatbot_arena(rows: Iterable[Record]) -> list[Record]:
    """LMSYS Chatbot Arena conversations with a decisive single-turn vote (ties are skipped)."""
    records = []
    for row in rows:
        winner = row.get("winner")
        if row.get("turn", 1) != 1 or winner not in ("model_a", "model_b"):
            continue
        loser = "model_b" if winner == "model_a" else "model_a"
        good, bad = row[f"conversation_{winner[-1]}"], row[f"conversation_{loser[-1]}"]
        if len(good) != 2 or len(bad) != 2 or good[0]["content"] != bad[0]["content"]:
            continue
        records.append({"instruction": good[0]["content"], "context": "", "good_res": good[1]["content"],
                        "bad_res": bad[1]["content"], "good_model": row[winner], "bad_model": row[loser],
                        "source": "Chatbot_Arena_Conversation", "language": row.get("language")})
    return records


def from_alpaca_gpt4(rows: Iterable[Record], rejected_rows: Iterable[Record]) -> list[Record]:
    """Alpaca-GPT4 (GPT-4 answers, good) joined on instruction + input with Alpaca's original answers
    (text-davinci-003, bad)."""
    bad_answers = {(row["instruction"], row.get("input", "")): row["output"] for row in rejected_rows}
    records = []
    for row in rows:
        bad = bad_answers.get((row["instruction"], row.get("input", "")))
        if bad is None or bad == row["output"]:
            continue
        records.append({"instruction": row["instruction"], "context": row.get("input", ""),
                        "good_res": row["output"], "bad_res": bad, "source": "alpaca-gpt4"})
    return records


_SIMPLE: dict[str, Callable[[Iterable[Record]], list[Record]]] = {
    "records": from_records, "oasst1": from_oasst1, "hh-rlhf": from_hh_rlhf,
    "chatbot-arena": from_chatbot_arena,
}


def load_preferences(location: str, format: str = "records", rejected: str | None = None) -> list[Record]:
    """Preference records from ``location`` in one of ``FORMATS``."""
    if format == "alpaca-gpt4":
        if rejected is None:
            raise DataError("alpaca-gpt4 needs --rejected-input: Alpaca's original answers to join with")
        return from_alpaca_gpt4(read_rows(location), read_rows(rejected))
    if format not in _SIMPLE:
        raise DataError(f"unknown input format {format!r}: choose one of {', '.join(FORMATS)}")
    return _SIMPLE[format](read_rows(location))
