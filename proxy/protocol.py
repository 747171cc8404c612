"""The wire: read a chat completion request, checking only the fields the gateway touches."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from proxy.errors import InvalidRequest, PayloadTooLarge

CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")


@dataclass(frozen=True)
class ChatRequest:
    """The parsed body (all fields kept) and the raw bytes, for byte-exact forwarding when untouched."""

    body: dict[str, Any]
    raw: bytes

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:  # straight from the ASGI channel: Request.stream()'s generator costs more than the copy
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type and "json" not in content_type.split(";", 1)[0].lower():
        raise InvalidRequest(f"Content-Type must be application/json, not {content_type!r}.",
                             code="invalid_content_type")
    # The standard library's reader, not orjson's: orjson turns integers past 64 bits into floats, and
    # nothing the user sent may be altered on its way upstream.
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise InvalidRequest("The request body nests JSON too deeply.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def parse_chat_request(raw: bytes, content_type: str | None) -> ChatRequest:
    body = parse_json_object(raw, content_type)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        _check_message(message, index)
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return ChatRequest(body, raw)


def _check_message(message: Any, index: int) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"{where} must be an object.", param=where)
    if not isinstance(message.get("role"), str):
        raise InvalidRequest(f"{where}.role is required and must be a string.", param=f"{where}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of content parts.",
                             param=f"{where}.content")
    for part_index, part in enumerate(content):
        part_where = f"{where}.content[{part_index}]"
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{part_where} must be an object with a 'type'.", param=part_where)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{part_where}.text must be a string.", param=f"{part_where}.text")
