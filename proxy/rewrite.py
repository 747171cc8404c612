"""One user turn as one prompt: find its text, and put the rewrite back in its place; pure functions.

Every request shape keeps a user turn's content the same way: a plain string, or a list of parts of which
some are text (chat's ``text``, the Responses API's ``input_text``, Anthropic's ``text`` blocks) and the others
are not (images, audio, files, tool results). ``turn_prompt`` and ``put_back`` work on such a content value
whatever the shape; ``proxy.shapes.Shape`` applies them to a request of its shape.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

# How a turn's text parts become one prompt (vLLM's chat templates join text parts the same way).
PART_SEPARATOR = "\n"
CHAT_TEXT_PARTS = frozenset({"text"})


@dataclass(slots=True)  # not frozen: built on every request, and a frozen dataclass costs 4x to build
class TurnPrompt:
    """A turn's text as one prompt, and where that text came from in the turn's content."""

    text: str
    part_indexes: tuple[int, ...] | None  # None: the content is a plain string; else every text part's index


def turn_prompt(content: Any, text_types: Container[str] = CHAT_TEXT_PARTS) -> TurnPrompt | None:
    """The prompt of one turn's ``content``; None when it holds no text to rewrite.

    ``content`` is a string, or a list of parts (objects with a ``type``); parts whose type is in
    ``text_types`` and whose ``text`` is a string are the text parts. Their non-blank texts are joined with
    ``PART_SEPARATOR`` into one prompt (one optimizer call, one ``--max-prompt-chars`` budget for the whole
    turn, and the context the optimizer needs: "Describe the chart" and "Be brief." belong together). One pass,
    linear in the content's size, whatever the number of parts.
    """
    if isinstance(content, str):
        return TurnPrompt(content, None) if content.strip() else None
    if not isinstance(content, list):
        return None
    indexes: list[int] = []
    texts: list[str] = []
    for index, part in enumerate(content):
        if isinstance(part, Mapping) and part.get("type") in text_types and isinstance(part.get("text"), str):
            indexes.append(index)
            if part["text"].strip():
                texts.append(part["text"])
    if not texts:
        return None
    return TurnPrompt(texts[0] if len(texts) == 1 else PART_SEPARATOR.join(texts), tuple(indexes))


def put_back(content: Any, prompt: TurnPrompt, rewrite: str) -> str | list[Any]:
    """``content`` with ``rewrite`` in place of the turn's text; ``content`` itself is left as it was.

    A string becomes the rewrite. In a part list the rewrite goes into the first text part (its other fields,
    such as Anthropic's ``cache_control``, kept) and the other text parts are removed: the rewrite stands for
    all of them. Non-text parts keep their order around it.
    """
    if prompt.part_indexes is None:
        return rewrite
    first, *others = prompt.part_indexes
    removed = set(others)
    parts = [part for index, part in enumerate(content) if index not in removed] if removed else list(content)
    parts[first] = {**content[first], "text": rewrite}  # no part before ``first`` was removed
    return parts


@dataclass(slots=True)
class UserTurn:
    """A user turn of a request (``message_index`` in its conversation) and its prompt."""

    message_index: int
    prompt: TurnPrompt
