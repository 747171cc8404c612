"""The fast path's pure parts: header relay, the relayed response, body encoding."""

from __future__ import annotations

import json

import orjson

from proxy.forward import RelayedResponse, downstream_headers, encode_body, extract_usage, sse_data, upstream_headers


def test_downstream_headers_keep_repeats_and_drop_hop_by_hop() -> None:
    upstream = [(b"Content-Type", b"application/json"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                (b"Transfer-Encoding", b"chunked"), (b"Connection", b"keep-alive"), (b"Date", b"x"),
                (b"Server", b"uvicorn"), (b"X-Request-Id", b"up-1"), (b"X-BPO-Cache", b"hit")]
    relayed = downstream_headers(upstream, {"x-request-id": "req_1", "x-bpo-applied": "false"})
    assert relayed == [(b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                       (b"x-upstream-request-id", b"up-1"), (b"x-request-id", b"req_1"),
                       (b"x-bpo-applied", b"false")]


def test_relayed_response_sets_content_length_except_where_http_forbids_it() -> None:
    assert (b"content-length", b"5") in RelayedResponse(b"hello", 200, []).raw_headers
    assert [name for name, _ in RelayedResponse(b"", 204, []).raw_headers] == []
    assert RelayedResponse(b"x", 200, [(b"x-a", b"1")]).headers["x-a"] == "1"


def test_upstream_headers_strip_ours_and_replace_the_key() -> None:
    client = {"host": "gw", "content-length": "5", "authorization": "Bearer client", "x-bpo": "off",
              "x-bpo-debug": "1", "openai-organization": "org"}
    assert upstream_headers(client, None) == {"authorization": "Bearer client", "openai-organization": "org",
                                              "accept-encoding": "identity"}
    assert upstream_headers(client, "sk-route")["authorization"] == "Bearer sk-route"
    azure = upstream_headers(client, "az-key", azure=True)
    assert azure["api-key"] == "az-key" and "authorization" not in azure


def test_encode_body_falls_back_where_orjson_would_alter_a_value() -> None:
    body = {"model": "m", "seed": 2**70, "n": 1}
    assert json.loads(encode_body(body, orjson_safe=True))["seed"] == 2**70  # orjson refuses it: stdlib writes
    assert encode_body({"a": "\ud800"}, orjson_safe=True) == b'{"a": "\\ud800"}'  # a lone surrogate stays escaped
    assert encode_body({"t": float("nan")}) == b'{"t": NaN}'  # only a stdlib-read body can hold NaN: kept
    assert orjson.loads(encode_body({"x": "é"}, orjson_safe=True)) == {"x": "é"}


def test_sse_data_yields_each_data_payload_without_done() -> None:
    stream = b'event: x\ndata: {"a":1}\n\ndata:{"b":2}\n\n: comment\ndata: [DONE]\n\n'
    assert list(sse_data(stream)) == [b' {"a":1}', b'{"b":2}']


def test_extract_usage_takes_the_last_event_that_carries_one() -> None:
    stream = (b'data: {"usage":{"total_tokens":1}}\n\ndata: {"choices":[]}\n\n'
              b'data: {"choices":[],"usage":{"total_tokens":7}}\n\ndata: [DONE]\n\n')
    assert extract_usage(stream) == {"total_tokens": 7}
    assert extract_usage(b'{"usage":{"total_tokens":3}}') == {"total_tokens": 3}
    assert extract_usage(b"data: [DONE]\n\n") is None
