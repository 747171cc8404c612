"""The request shapes the gateway rewrites: where each keeps its user turns, and how it reports errors.

Chat completions, the Responses API and Anthropic's Messages API all hold a conversation as a list of items
(``messages`` / ``input``) whose user items carry a content value ``proxy/rewrite.py`` understands: a string
or a list of parts, some of them text. A ``Shape`` names the list, the text part types, which items are the
user's, the structured-output switch, the error body and the reader of its answers' text
(``proxy/answers.py``); everything else (A/B, cache, guard, headers, metrics, events, shadow judge) is the one
pipeline in ``proxy/serving.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from proxy.answers import chat_answer_text, messages_answer_text, responses_answer_text
from proxy.errors import ProxyError, error_response
from proxy.protocol import WireRequest, parse_chat_request, parse_messages_request, parse_responses_request
from proxy.rewrite import UserTurn, put_back, turn_prompt

WHOLE_INPUT = -1  # UserTurn.message_index of a Responses ``input`` given as one string

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          529: "overloaded_error"}


def _openai_error(exc: ProxyError) -> Response:
    return exc.response()


def anthropic_error(exc: ProxyError) -> Response:
    """``{"type": "error", "error": {"type", "message"}}``, as Anthropic's API and SDK expect; the gateway's own
    ``code`` rides along when it has one (``budget_exceeded`` and ``rate_limit_exceeded`` share a type)."""
    error = {"type": _ANTHROPIC_ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message}
    if exc.code:
        error["code"] = exc.code
    body = orjson.dumps({"type": "error", "error": error})
    return Response(body, status_code=exc.status, media_type="application/json", headers=exc.headers)


def _format_type(value: Any) -> Any:
    return value.get("type") if isinstance(value, Mapping) else None


def _is_user_message(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("role") == "user"


def _is_user_input(item: Any) -> bool:
    """A Responses input item from the user: a message (``type`` absent or ``message``) with role user."""
    return _is_user_message(item) and item.get("type", "message") == "message"


@dataclass(frozen=True)
class Shape:
    """One request shape; ``route`` is its value of the ``route`` metric label (bounded: three)."""

    route: str
    path: str
    items: str  # the body field holding the conversation
    text_types: frozenset[str]
    is_user: Callable[[Any], bool]
    parse: Callable[[bytes, str | None], WireRequest]
    json_schema: Callable[[Mapping[str, Any]], bool]  # the client asked for output that fits a schema
    error_response: Callable[[ProxyError], Response]
    answer_text: Callable[[bytes], str | None]  # a response's answer text (plain or SSE), None when it has none

    def newest_turn(self, body: Mapping[str, Any]) -> UserTurn | None:
        """The last item's prompt when that item is the user's and holds text; None for any other turn."""
        items = body.get(self.items)
        if isinstance(items, str):  # Responses: ``input`` as one string
            prompt = turn_prompt(items)
            return None if prompt is None else UserTurn(WHOLE_INPUT, prompt)
        if not isinstance(items, list) or not items or not self.is_user(items[-1]):
            return None
        prompt = turn_prompt(items[-1].get("content"), self.text_types)
        return None if prompt is None else UserTurn(len(items) - 1, prompt)

    def earlier_turns(self, body: Mapping[str, Any]) -> list[UserTurn]:
        """The user items before the last item that hold text (the conversation's history)."""
        items = body.get(self.items)
        if not isinstance(items, list):
            return []
        turns = []
        for index in range(len(items) - 1):
            if self.is_user(items[index]):
                prompt = turn_prompt(items[index].get("content"), self.text_types)
                if prompt is not None:
                    turns.append(UserTurn(index, prompt))
        return turns

    def put_back(self, body: Mapping[str, Any], rewrites: Sequence[tuple[UserTurn, str]]) -> dict[str, Any]:
        """A copy of ``body`` with each turn's text replaced by its rewrite; nothing else changes.

        Only the containers on the path to a changed text are copied, so the caller's body stays intact.
        """
        if len(rewrites) == 1 and rewrites[0][0].message_index == WHOLE_INPUT:
            return {**body, self.items: rewrites[0][1]}
        items = list(body[self.items])
        for turn, text in rewrites:
            item = dict(items[turn.message_index])
            item["content"] = put_back(item["content"], turn.prompt, text)
            items[turn.message_index] = item
        return {**body, self.items: items}


CHAT = Shape("chat", "/v1/chat/completions", "messages", frozenset({"text"}), _is_user_message,
             parse_chat_request, lambda body: _format_type(body.get("response_format")) == "json_schema",
             _openai_error, chat_answer_text)
RESPONSES = Shape("responses", "/v1/responses", "input", frozenset({"input_text"}), _is_user_input,
                  parse_responses_request,
                  lambda body: _format_type(_format_of(body.get("text"))) == "json_schema", _openai_error,
                  responses_answer_text)
MESSAGES = Shape("messages", "/v1/messages", "messages", frozenset({"text"}), _is_user_message,
                 parse_messages_request,
                 lambda body: _format_type(body.get("output_format")) == "json_schema", anthropic_error,
                 messages_answer_text)
SHAPES = (CHAT, RESPONSES, MESSAGES)


def _format_of(text: Any) -> Any:
    return text.get("format") if isinstance(text, Mapping) else None


def error_for_path(path: str, exc: ProxyError) -> Response:
    """An error in the shape of the route at ``path`` (Anthropic's under /v1/messages, OpenAI's elsewhere):
    for concerns that answer before a route does (auth, limits)."""
    if path == MESSAGES.path or path.startswith(MESSAGES.path + "/"):
        return anthropic_error(exc)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
