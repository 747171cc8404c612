"""Reading a chat completion request: orjson where it reads exactly, the standard library where it does not."""

from __future__ import annotations

import json

import pytest

from proxy.errors import InvalidRequest
from proxy.protocol import dumps_iteratively, parse_chat_request

MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'


def chat(fields: str) -> bytes:
    return ("{" + fields + ", " + MESSAGES + "}").encode()


def test_a_plain_body_is_read_by_orjson_and_is_its_own_exact_body() -> None:
    request = parse_chat_request(chat('"model": "m", "stream": true, "seed": 42'), "application/json")
    assert request.read_by_orjson and request.model == "m" and request.stream is True
    assert request.exact_body is request.body


@pytest.mark.parametrize("number", ["18446744073709551616", "-9999999999999999999", "1" * 40])
def test_integers_orjson_would_turn_into_floats_come_back_exact(number: str) -> None:
    request = parse_chat_request(chat(f'"model": "m", "seed": {number}'), "application/json")
    assert request.exact_body["seed"] == int(number) and isinstance(request.exact_body["seed"], int)


def test_long_digit_runs_inside_strings_cost_a_reparse_but_change_nothing() -> None:
    body = chat('"model": "m", "user": "card 1234567890123456789012"')
    request = parse_chat_request(body, "application/json")
    assert request.exact_body == request.body == json.loads(body)


@pytest.mark.parametrize("fields", ['"model": "m", "temperature": NaN', '"model": "m", "user": "\\ud800"',
                                    '"model": "m", "x": 1e400'])
def test_what_orjson_refuses_the_standard_library_still_reads(fields: str) -> None:
    request = parse_chat_request(chat(fields), "application/json")
    assert not request.read_by_orjson and request.exact_body is request.body
    assert json.dumps(request.body) == json.dumps(json.loads(chat(fields)))  # NaN != NaN: compare as text


def test_utf16_json_is_read_as_json_allows() -> None:
    request = parse_chat_request(chat('"model": "m"').decode().encode("utf-16"), "application/json")
    assert request.model == "m" and not request.read_by_orjson


@pytest.mark.parametrize("body", [b"{", b"[]", b'"x"', b"\xff\xfe\x00"])
def test_what_neither_reads_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_chat_request(body, "application/json")


@pytest.mark.parametrize("value", [{}, [], {"a": [1, 2.5, {"b": None}], "c": "é\ud800", "d": float("nan"),
                                             "e": 10**30, "f": True, "": [[], {}]}])
def test_dumps_iteratively_writes_what_json_dumps_writes(value: object) -> None:
    assert dumps_iteratively(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert dumps_iteratively(value, ensure_ascii=True) == json.dumps(value, separators=(",", ":"))


def test_dumps_iteratively_writes_nesting_no_recursive_writer_takes() -> None:
    deep: list[object] = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    assert dumps_iteratively({"x": deep}) == '{"x":' + "[" * 5001 + "]" * 5001 + "}"
