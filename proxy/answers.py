"""The answer's text in a response of each request shape, plain JSON or SSE: what a judge reads.

One reader per shape (``Shape.answer_text`` names it): chat completions (the first choice), the Responses
API (``output_text`` parts of ``message`` items) and Anthropic's Messages API (``text`` blocks). Each gives
None for an answer with no text (tool calls only, a refusal), a stream that ended in an error event, or a
body in no shape it knows: these run inside the user's request, so an odd upstream body never raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson

from proxy.forward import sse_data

Events = list[dict[str, Any]]
# Event types that end a stream without an answer: the gateway's own error event (proxy/errors.py), the
# Responses API's ``error`` and ``response.failed``, Anthropic's ``error``.
_FAILED_EVENTS = frozenset({"error", "response.failed"})


def chat_answer_text(payload: bytes) -> str | None:
    """The first choice's text from a chat completion JSON body or from its SSE chunks."""
    return _answer(payload, _chat_body_text, _chat_events_text)


def responses_answer_text(payload: bytes) -> str | None:
    """A Responses API answer's ``output_text`` parts: from the JSON body, or from its stream's
    ``response.completed`` payload (its ``response.output_text.delta`` events when it has none)."""
    return _answer(payload, _responses_body_text, _responses_events_text)


def messages_answer_text(payload: bytes) -> str | None:
    """An Anthropic message's ``text`` blocks: from the JSON body, or from the ``text_delta`` events of its
    stream."""
    return _answer(payload, _messages_body_text, _messages_events_text)


def _answer(payload: bytes, from_body: Callable[[Any], str], from_events: Callable[[Events], str]) -> str | None:
    stripped = payload.lstrip()
    if stripped.startswith(b"{"):
        try:
            text = from_body(orjson.loads(stripped))
        except orjson.JSONDecodeError:
            return None
    else:
        events = list(_events(payload))
        if any(_failed(event) for event in events):
            return None  # a stream that broke off: what came before is no whole answer
        text = from_events(events)
    return text if text.strip() else None


def _events(payload: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's ``data:`` lines; anything else is skipped."""
    for data in sse_data(payload):
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def _failed(event: dict[str, Any]) -> bool:
    # OpenAI's chat streams report an error as a chunk holding ``error``.
    return event.get("type") in _FAILED_EVENTS or event.get("error") is not None


def _field(value: Any, name: str) -> Any:
    """``value[name]`` when ``value`` is a JSON object, else None."""
    return value.get(name) if isinstance(value, dict) else None


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """The JSON objects in ``value`` when it is a list; anything else in it is skipped."""
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def _texts(parts: Any, kind: str) -> str:
    """The ``text`` of each part of type ``kind``, joined (as the SDKs' ``output_text`` joins them)."""
    return "".join(part["text"] for part in _objects(parts)
                   if part.get("type") == kind and isinstance(part.get("text"), str))


def _first_choices(body: Any) -> Iterator[dict[str, Any]]:
    """The choices of index 0 in a completion or chunk body."""
    yield from (choice for choice in _objects(_field(body, "choices")) if choice.get("index", 0) == 0)


def _chat_body_text(body: Any) -> str:
    content = _field(_field(next(_first_choices(body), None), "message"), "content")
    return content if isinstance(content, str) else ""


def _chat_events_text(events: Events) -> str:
    deltas = (_field(choice.get("delta"), "content") for event in events for choice in _first_choices(event))
    return "".join(delta for delta in deltas if isinstance(delta, str))


def _responses_body_text(body: Any) -> str:
    messages = (item for item in _objects(_field(body, "output")) if item.get("type") == "message")
    return "".join(_texts(item.get("content"), "output_text") for item in messages)


def _responses_events_text(events: Events) -> str:
    for event in events:
        if event.get("type") == "response.completed":
            return _responses_body_text(event.get("response"))
    return "".join(event["delta"] for event in events
                   if event.get("type") == "response.output_text.delta" and isinstance(event.get("delta"), str))


def _messages_body_text(body: Any) -> str:
    return _texts(_field(body, "content"), "text")


def _messages_events_text(events: Events) -> str:
    return _texts([event.get("delta") for event in events if event.get("type") == "content_block_delta"],
                  "text_delta")
