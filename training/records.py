"""Reading and writing the JSON / JSONL record files every stage trades in, crash-safe and resumable."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from training.errors import DataError

Record = dict[str, Any]
__all__ = ["DataError", "JsonlAppender", "PromptParts", "Record", "prompt_parts", "read_records"]


def read_records(path: str | Path) -> list[Record]:
    """Objects from a JSON file (one object or a list) or a JSONL file (one object per line)."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not a valid JSON array ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                            ) from exc
        return list(_require_objects(records, path))
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return list(_read_lines(text, path))
    return [whole] if isinstance(whole, dict) else _require_objects(whole, path)


def _read_lines(text: str, path: str | Path) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield record


def _require_objects(records: Any, path: str | Path) -> list[Record]:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a JSON list of objects")
    return records


@dataclass(frozen=True)
class PromptParts:
    """A user prompt as the datasets carry it: an instruction and an optional context passage."""

    instruction: str
    context: str = ""

    @property
    def text(self) -> str:
        return join_context(self.instruction, self.context)


def join_context(instruction: str, context: str) -> str:
    """The single prompt a user would send: the instruction, then its context on the next line."""
    instruction, context = instruction.strip(), context.strip()
    return f"{instruction}\n{context}" if context else instruction


def prompt_parts(record: Record) -> PromptParts:
    """The prompt of a record carrying ``prompt``, ``instruction`` (+ ``context``/``input``) or ``text``."""
    if isinstance(record.get("prompt"), str):
        return PromptParts(record["prompt"].strip())
    if isinstance(record.get("instruction"), str):
        context = record.get("context") or record.get("input") or ""
        return PromptParts(record["instruction"].strip(), str(context).strip())
    if isinstance(record.get("text"), str):
        return PromptParts(record["text"].strip())
    raise DataError(f"record has no prompt, instruction or text field: keys {sorted(record)}")


def stable_key(*parts: str) -> str:
    """A short content hash: the same inputs give the same key in every run (used to resume)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:16]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_done(path: str | Path, key_field: str = "key") -> list[Record]:
    """Records already written to an output file; a torn last line (a crash mid-write) is ignored."""
    target = Path(path)
    if not target.exists():
        return []
    done: list[Record] = []
    for line in target.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and key_field in record:
            done.append(record)
    return done


class JsonlAppender:
    """Appends one record per line and flushes it to disk at once, so a crash loses nothing written.

    Opening repairs a torn last line left by a killed run: it is cut off, since half a record is no record.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self._handle: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: Record) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    path.write_bytes(data[: data.rfind(b"\n") + 1])


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON through a temporary file so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    temporary.replace(target)


def write_jsonl(path: str | Path, records: Iterable[Record]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
