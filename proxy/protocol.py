"""The wire: read a request of each shape (chat completions, Responses, Messages), checking only the fields
the gateway touches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from proxy.errors import InvalidRequest, PayloadTooLarge

CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")

# orjson reads integers past 64 bits as floats. A run of 19 digits is the shortest that may be one; found by
# mapping digits to "0" and the rest to " " (a regex's counted repeat costs 5-10x more on every body).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN = b"0" * 19


@dataclass(slots=True)
class WireRequest:
    """A parsed request of any shape: the body (all fields kept) and the raw bytes, for byte-exact forwarding
    when untouched.

    ``body`` comes from orjson when it can read the bytes (~6x faster than the standard library); it serves
    every look at the request. What goes upstream re-encoded is built from ``exact_body`` instead.
    """

    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    read_by_orjson: bool = True

    @property
    def exact_body(self) -> dict[str, Any]:
        """The body exactly as the standard library reads it: integers past 64 bits stay integers."""
        if self.read_by_orjson and _LONG_DIGIT_RUN in self.raw.translate(_DIGITS_ONLY):
            try:
                exact: dict[str, Any] = json.loads(self.raw)
            except RecursionError as exc:  # orjson reads 1024 levels; the standard library fewer
                raise InvalidRequest("The request body nests JSON too deeply.", code="invalid_json") from exc
            return exact
        return self.body


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    return await read_body_from(request.receive, request.headers.get("content-length"), limit)


async def read_body_from(receive: Receive, declared: str | None, limit: int) -> bytes:
    """``read_body`` on the bare ASGI channel; ``declared`` is the Content-Length header, if any."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:  # straight from the ASGI channel: Request.stream()'s generator costs more than the copy
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Token(str):
    """Punctuation already written as JSON, on ``dumps_iteratively``'s stack among the values to write."""


def dumps_iteratively(value: Any, ensure_ascii: bool = False) -> str:
    """``json.dumps(value)`` (compact) without recursion, for bodies nested deeper than the stack allows.

    orjson reads up to 1024 levels; both writers give up sooner (orjson at 255, the standard library near the
    interpreter's recursion limit less the frames in use). One pass, linear in the output.
    """
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            out.append(item)
        elif isinstance(item, dict):
            out.append("{")
            stack.append(_Token("}"))
            for index, (key, member) in reversed(list(enumerate(item.items()))):
                stack.append(member)
                stack.append(_Token(("," if index else "") + json.dumps(key, ensure_ascii=ensure_ascii) + ":"))
        elif isinstance(item, list):
            out.append("[")
            stack.append(_Token("]"))
            for index in range(len(item) - 1, -1, -1):
                stack.append(item[index])
                if index:
                    stack.append(_Token(","))
        else:
            out.append(json.dumps(item, ensure_ascii=ensure_ascii))
    return "".join(out)


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    return _read_json_object(raw, content_type)[0]


def _read_json_object(raw: bytes, content_type: str | None) -> tuple[dict[str, Any], bool]:
    """The body and whether orjson read it. What orjson refuses, the standard library may still take (lone
    surrogate escapes, NaN, UTF-16): the client sent it, so it goes on as sent."""
    if content_type and "json" not in content_type.split(";", 1)[0].lower():
        raise InvalidRequest(f"Content-Type must be application/json, not {content_type!r}.",
                             code="invalid_content_type")
    by_orjson = True
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        by_orjson = False
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
        except RecursionError as exc:
            raise InvalidRequest("The request body nests JSON too deeply.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body, by_orjson


def parse_chat_request(raw: bytes, content_type: str | None) -> WireRequest:
    """``POST /v1/chat/completions`` and (Anthropic) ``POST /v1/messages``: ``messages`` is a non-empty list of
    role/content objects; only the fields the gateway touches are checked."""
    body, by_orjson = _read_json_object(raw, content_type)
    model = _model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        _check_message(message, index)
    return WireRequest(body, raw, model, _stream_of(body), by_orjson)


parse_messages_request = parse_chat_request  # the two wires agree on everything checked here


def parse_responses_request(raw: bytes, content_type: str | None) -> WireRequest:
    """``POST /v1/responses``: ``input`` is a string or a list of items (``input`` may be absent: a stored
    ``prompt`` or ``previous_response_id`` carries the conversation); user items' parts are checked."""
    body, by_orjson = _read_json_object(raw, content_type)
    model = _model_of(body)
    given = body.get("input")
    if given is not None and not isinstance(given, (str, list)):
        raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    for index, item in enumerate(given if isinstance(given, list) else ()):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{index}] must be an object.", param=f"input[{index}]")
        if "role" in item:
            _check_message(item, index, "input", ("input_text",))
    return WireRequest(body, raw, model, _stream_of(body), by_orjson)


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    return model


def _stream_of(body: dict[str, Any]) -> bool:
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return bool(body.get("stream"))


def _check_message(message: Any, index: int, field: str = "messages",
                   text_types: tuple[str, ...] = ("text",)) -> None:
    """Raises for the first malformed field; the common, well-formed message builds no strings."""
    if not isinstance(message, dict):
        where = f"{field}[{index}]"
        raise InvalidRequest(f"{where} must be an object.", param=where)
    if not isinstance(message.get("role"), str):
        where = f"{field}[{index}].role"
        raise InvalidRequest(f"{where} is required and must be a string.", param=where)
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        where = f"{field}[{index}].content"
        raise InvalidRequest(f"{where} must be a string or an array of content parts.", param=where)
    for part_index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            where = f"{field}[{index}].content[{part_index}]"
            raise InvalidRequest(f"{where} must be an object with a 'type'.", param=where)
        if part["type"] in text_types and not isinstance(part.get("text"), str):
            where = f"{field}[{index}].content[{part_index}].text"
            raise InvalidRequest(f"{where} must be a string.", param=where)
