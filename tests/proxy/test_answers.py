"""The answer-text readers of each shape: plain JSON and SSE, tool-only answers, broken streams, odd bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from proxy.answers import chat_answer_text, messages_answer_text, responses_answer_text
from proxy.errors import UpstreamStreamBroken, error_event
from proxy.shapes import CHAT, MESSAGES, RESPONSES
from tests.fakes.upstream import chat_reply, messages_reply, named_event, responses_reply, sse_chunks

Reader = Callable[[bytes], "str | None"]
READERS = [chat_answer_text, responses_answer_text, messages_answer_text]


def plain(reply_json: Any) -> bytes:
    return orjson.dumps(reply_json)


def data(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def test_each_shape_names_its_reader() -> None:
    assert (CHAT.answer_text, RESPONSES.answer_text, MESSAGES.answer_text) == tuple(READERS)


# -- chat completions ----------------------------------------------------------------------------------


def test_chat_text_from_json_and_from_sse() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    assert chat_answer_text(plain(chat_reply(body, "hello there").json)) == "hello there"
    stream = b"".join(sse_chunks("m", "hello there", n=2, include_usage=True))
    assert chat_answer_text(stream) == "hello there "  # the first choice only, the fake's deltas as sent
    assert chat_answer_text(b"not a response") is None


def test_chat_skips_odd_choices_to_find_the_first_real_one() -> None:
    assert chat_answer_text(b'{"choices": [1, "x", {"index": 0, "message": {"content": "yes"}}]}') == "yes"
    assert chat_answer_text(b'data: {"choices": [2, {"delta": {"content": "a"}}]}\n\n'
                            b'data: {"choices": [{"delta": {"content": "b"}}]}\n\n') == "ab"


def test_a_chat_answer_with_only_tool_calls_has_no_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    assert chat_answer_text(plain(body)) is None
    stream = (data({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
              + data({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **call}]}}]})
              + b"data: [DONE]\n\n")
    assert chat_answer_text(stream) is None


# -- the Responses API ---------------------------------------------------------------------------------


def test_responses_text_from_json_and_from_sse() -> None:
    body = {"model": "m", "input": "hi"}
    assert responses_answer_text(plain(responses_reply(body, "hello there").json)) == "hello there"
    events = responses_reply({**body, "stream": True}, "hello there").sse or []
    assert responses_answer_text(b"".join(events)) == "hello there"  # the response.completed payload
    deltas = [event for event in events if b"response.completed" not in event]
    assert responses_answer_text(b"".join(deltas)) == "hello there "  # without it: the deltas as sent


def test_responses_text_is_the_message_items_output_text_only() -> None:
    body = {"output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "It is ", "annotations": []}, {"type": "refusal", "refusal": "no"},
            {"type": "output_text", "text": "sunny.", "annotations": []}]}]}
    assert responses_answer_text(plain(body)) == "It is sunny."
    completed = {"type": "response.completed", "response": body}
    assert responses_answer_text(named_event("response.completed", completed)) == "It is sunny."


def test_a_responses_answer_with_only_a_function_call_has_no_text() -> None:
    body = {"status": "completed", "output": [{"type": "function_call", "call_id": "c1", "name": "f",
                                               "arguments": "{}"}]}
    assert responses_answer_text(plain(body)) is None
    stream = (named_event("response.function_call_arguments.delta",
                          {"type": "response.function_call_arguments.delta", "delta": "{}"})
              + named_event("response.completed", {"type": "response.completed", "response": body}))
    assert responses_answer_text(stream) is None


def test_a_failed_responses_stream_has_no_answer() -> None:
    delta = named_event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "half"})
    failed = named_event("response.failed", {"type": "response.failed", "response": {"status": "failed"}})
    assert responses_answer_text(delta + failed) is None
    assert responses_answer_text(delta + named_event("error", {"type": "error", "message": "x"})) is None


# -- Anthropic's Messages API --------------------------------------------------------------------------


def test_messages_text_from_json_and_from_sse() -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert messages_answer_text(plain(messages_reply(body, "hello there").json)) == "hello there"
    stream = b"".join(messages_reply({**body, "stream": True}, "hello there").sse or [])
    assert messages_answer_text(stream) == "hello there "  # the fake's text_delta events, as sent


def test_messages_text_is_the_text_blocks_only() -> None:
    body = {"type": "message", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Let me check. "},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}, {"type": "text", "text": "Done."}]}
    assert messages_answer_text(plain(body)) == "Let me check. Done."
    stream = b"".join([
        named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        named_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "text_delta", "text": "Let me check."}}),
        named_event("content_block_delta", {"type": "content_block_delta", "index": 2,
                                            "delta": {"type": "input_json_delta", "partial_json": "{}"}})])
    assert messages_answer_text(stream) == "Let me check."


def test_a_messages_answer_with_only_tool_use_has_no_text() -> None:
    body = {"type": "message", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            "stop_reason": "tool_use"}
    assert messages_answer_text(plain(body)) is None
    stream = b"".join([
        named_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "tool_use", "id": "t1", "name": "f"}}),
        named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        named_event("message_stop", {"type": "message_stop"})])
    assert messages_answer_text(stream) is None


def test_a_messages_stream_that_ends_in_an_error_has_no_answer() -> None:
    delta = named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": "half"}})
    overloaded = named_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})
    assert messages_answer_text(delta) == "half"
    assert messages_answer_text(delta + overloaded) is None


# -- every shape ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("read", "text"), [
    (chat_answer_text, {"choices": [{"index": 0, "delta": {"content": "half"}}]}),
    (responses_answer_text, {"type": "response.output_text.delta", "delta": "half"}),
    (messages_answer_text, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "half"}})])
def test_a_stream_the_gateway_ended_with_its_error_event_has_no_answer(read: Reader, text: dict[str, Any]) -> None:
    broken = error_event(UpstreamStreamBroken("The upstream broke off the stream; the answer is incomplete."))
    assert read(data(text)) == "half"
    assert read(data(text) + broken) is None


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("payload", [
    b'{"choices": [1]}', b'{"choices": "ab"}', b'{"choices": [{"message": "x"}]}', b'{"choices": {"0": 1}}',
    b'{"choices": [{"index": 0, "message": {"content": 5}}]}', b'{"choices": [null, "x"]}', b"{", b"",
    b'{"output": "x"}', b'{"output": [1, {"type": "message", "content": "x"}]}',
    b'{"output": [{"type": "message", "content": [{"type": "output_text", "text": 5}]}]}',
    b'{"content": "x"}', b'{"content": [null, {"type": "text"}, {"type": "text", "text": ["a"]}]}',
    b'{"choices": [{"index": 0, "message": {"content": "   "}}]}',
    b'data: {"choices": [1]}\n\ndata: "text"\n\ndata: [1]\n\n',
    b'data: {"choices": [{"index": 0, "delta": "x"}, {"delta": {"content": 7}}]}\n\n',
    b'data: {"type": "response.completed", "response": [1]}\n\ndata: {"type": "response.output_text.delta"}\n\n',
    b'data: {"type": "content_block_delta", "delta": "x"}\n\ndata: {"type": "content_block_delta"}\n\n',
    b'data: {"type": "response.output_text.delta", "delta": 5}\n\n'])
def test_no_body_shape_makes_a_reader_raise(read: Reader, payload: bytes) -> None:
    assert read(payload) is None  # no real answer text in any of them
