"""Find the texts of the last user message, and put rewrites in their place; pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)  # not frozen: built on every request, and a frozen dataclass costs 4x to build
class UserTurn:
    """The last user message's texts: one plain string, or each ``text`` part of a content-part list."""

    message_index: int
    texts: tuple[str, ...]
    part_indexes: tuple[int, ...] | None  # None: the content is a plain string


def find_last_user_text(messages: Sequence[Any]) -> UserTurn | None:
    """The last message's texts when that message is the user's; None for any other turn or no text."""
    if not messages:
        return None
    index = len(messages) - 1
    message = messages[index]
    if not isinstance(message, Mapping) or message.get("role") != "user":
        return None
    content = message.get("content")
    if isinstance(content, str):
        return UserTurn(index, (content,), None) if content.strip() else None
    if isinstance(content, list):
        parts = [(i, p["text"]) for i, p in enumerate(content)
                 if isinstance(p, Mapping) and p.get("type") == "text"
                 and isinstance(p.get("text"), str) and p["text"].strip()]
        if parts:
            return UserTurn(index, tuple(t for _, t in parts), tuple(i for i, _ in parts))
    return None


def replace_user_text(body: Mapping[str, Any], turn: UserTurn, new_texts: Sequence[str]) -> dict[str, Any]:
    """A copy of ``body`` whose last user message carries ``new_texts``; nothing else changes.

    Only the containers on the path to the changed text are copied, so the caller's body stays intact.
    """
    if len(new_texts) != len(turn.texts):
        raise ValueError("one rewrite per text is needed")
    messages = list(body["messages"])
    message = dict(messages[turn.message_index])
    if turn.part_indexes is None:
        message["content"] = new_texts[0]
    else:
        parts = list(message["content"])
        for index, text in zip(turn.part_indexes, new_texts, strict=True):
            parts[index] = {**parts[index], "text": text}
        message["content"] = parts
    messages[turn.message_index] = message
    return {**body, "messages": messages}
