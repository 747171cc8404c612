"""OpenTelemetry end to end: the real gateway exports over OTLP/HTTP to a small collector on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.fakes.proxy_server import REPO
from tests.fakes.upstream import FakeUpstream, chat_reply, free_port

from .conftest import StartProxy

PROMPT = "Suggest a name for a bakery"
CHUNK_DELAY = 0.05


class Collector:
    """An OTLP/HTTP trace receiver: records every exported span, answers 200."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path == "/v1/traces":
                    collector.requests.append(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        return [span for request in self.requests for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]

    def traces(self) -> list[dict[str, Any]]:
        """Each trace's spans by name, in the order the traces began."""
        traces: dict[bytes, dict[str, Any]] = {}
        for span in sorted(self.spans(), key=lambda span: span.start_time_unix_nano):
            traces.setdefault(span.trace_id, {})[span.name] = span
        return list(traces.values())


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span.attributes:
        value = item.value
        out[item.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.shutdown()


def test_one_trace_per_request_with_rewrite_and_upstream_spans(
        upstream: FakeUpstream, start_proxy: StartProxy, collector: Collector) -> None:
    proxy = start_proxy(otel_endpoint=collector.url)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=30)
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": PROMPT}])
    proxy.stop()  # shutdown flushes the spans

    spans = collector.spans()
    by_name = {span.name: span for span in spans}
    root = by_name["POST /v1/chat/completions"]
    rewrite, call = by_name["bpo.rewrite"], by_name["chat fake-model"]
    assert root.parent_span_id == b"" and rewrite.parent_span_id == root.span_id
    assert call.parent_span_id == root.span_id
    assert rewrite.trace_id == call.trace_id == root.trace_id

    # The rewrite's stages, children of bpo.rewrite, one after the other: the lookup ends as the optimizer
    # call begins (a miss computed here), the guard reads the finished rewrite.
    lookup, optimizer, guard = by_name["bpo.cache.lookup"], by_name["bpo.optimizer"], by_name["bpo.guard"]
    assert {lookup.parent_span_id, optimizer.parent_span_id, guard.parent_span_id} == {rewrite.span_id}
    assert {lookup.trace_id, optimizer.trace_id, guard.trace_id} == {root.trace_id}
    assert lookup.end_time_unix_nano <= optimizer.start_time_unix_nano
    assert optimizer.end_time_unix_nano <= guard.start_time_unix_nano <= guard.end_time_unix_nano
    assert rewrite.start_time_unix_nano <= lookup.start_time_unix_nano
    assert guard.end_time_unix_nano <= rewrite.end_time_unix_nano
    assert attributes(lookup) == {"bpo.cache": "miss"}
    assert attributes(optimizer)["bpo.optimizer.backend"] == "remote"
    assert attributes(optimizer)["bpo.optimizer"].startswith("remote:")
    assert "bpo.optimizer.batch_size" not in attributes(optimizer)  # a remote server batches out of sight
    assert attributes(guard) == {"bpo.guard.verdict": "accepted"}

    assert attributes(rewrite)["gen_ai.request.model"] == "fake-model"
    assert attributes(rewrite)["bpo.applied"] is True and attributes(rewrite)["bpo.guard.verdict"] == "accepted"
    upstream_attributes = attributes(call)
    assert upstream_attributes["gen_ai.usage.input_tokens"] == 11
    assert upstream_attributes["gen_ai.usage.output_tokens"] > 0
    # No prompt text without --events-include-text.
    assert not any(PROMPT in str(value) for span in spans for value in attributes(span).values())

    traceparent = upstream.requests_to("/v1/chat/completions")[-1].headers["traceparent"]
    version, trace_id, parent_id, _ = traceparent.split("-")
    assert version == "00" and trace_id == root.trace_id.hex() and parent_id == call.span_id.hex()


def test_a_down_collector_fails_open_and_is_counted(start_proxy: StartProxy) -> None:
    proxy = start_proxy(otel_endpoint=f"http://127.0.0.1:{free_port()}")
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=30)
    for _ in range(3):
        reply = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": PROMPT}])
        assert reply.choices[0].message.content
    deadline = time.monotonic() + 60
    failures = 0.0
    while time.monotonic() < deadline and not failures:
        for line in httpx.get(proxy.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith('bpo_fail_open_total{component="tracing"}'):
                failures = float(line.split()[-1])
        time.sleep(0.5)
    assert failures >= 1


def test_without_an_endpoint_nothing_of_opentelemetry_is_imported() -> None:
    code = ("import sys; from proxy.app import create_app; from tests.fakes.proxy_server import make_settings; "
            "create_app(make_settings()); print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]"


def test_a_cache_hit_is_the_lookup_alone_and_a_stream_ends_its_span_with_its_usage(
        upstream: FakeUpstream, start_proxy: StartProxy, collector: Collector) -> None:
    upstream.responders["/v1/chat/completions"] = lambda recorded: replace(chat_reply(recorded.json),
                                                                           chunk_delay=CHUNK_DELAY)
    proxy = start_proxy(otel_endpoint=collector.url)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=30)
    messages: Any = [{"role": "user", "content": PROMPT}]
    client.chat.completions.create(model="fake-model", messages=messages)
    chunks = list(client.chat.completions.create(model="fake-model", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    proxy.stop()

    first, second = collector.traces()
    assert {"bpo.optimizer", "bpo.guard"} <= set(first)
    assert set(second) == {"POST /v1/chat/completions", "bpo.rewrite", "bpo.cache.lookup", "chat fake-model"}
    assert attributes(second["bpo.cache.lookup"]) == {"bpo.cache": "hit"}
    assert second["bpo.cache.lookup"].parent_span_id == second["bpo.rewrite"].span_id

    # The upstream span lasts as long as the stream (each chunk waits CHUNK_DELAY after it), and carries the
    # usage of its final chunk.
    call = second["chat fake-model"]
    assert call.end_time_unix_nano - call.start_time_unix_nano >= (len(chunks) - 1) * CHUNK_DELAY * 1e9
    assert attributes(call)["gen_ai.usage.input_tokens"] == 11
    assert attributes(call)["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens > 0


def test_the_optimized_prompt_is_an_attribute_only_with_events_include_text(
        start_proxy: StartProxy, collector: Collector) -> None:
    proxy = start_proxy(otel_endpoint=collector.url, events_include_text=True)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=30)
    reply = client.chat.completions.with_raw_response.create(model="fake-model",
                                                             messages=[{"role": "user", "content": PROMPT}])
    proxy.stop()
    (trace,) = collector.traces()
    assert reply.headers["x-bpo-applied"] == "true"
    optimized = attributes(trace["bpo.rewrite"])["bpo.optimized_prompt"]
    assert PROMPT in optimized and optimized != PROMPT
    # The stages never carry text, whatever the flag.
    for name in ("bpo.cache.lookup", "bpo.optimizer", "bpo.guard"):
        assert not any(PROMPT in str(value) for value in attributes(trace[name]).values())


def test_a_litellm_route_sends_the_traceparent_of_its_upstream_span(
        tmp_path: Path, upstream: FakeUpstream, start_proxy: StartProxy, collector: Collector) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        model_list:
          - model_name: claude
            litellm_params:
              model: anthropic/claude-fake
              api_base: http://127.0.0.1:{upstream.port}
              api_key: sk-ant-route
    """))
    proxy = start_proxy(config=str(config), upstream_base_url=None, optimizer="none", otel_endpoint=collector.url)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=60)
    assert client.chat.completions.create(model="claude", messages=[{"role": "user", "content": PROMPT}]).choices
    proxy.stop()

    (trace,) = collector.traces()
    (call,) = [span for span in trace.values() if span.kind == Span.SpanKind.SPAN_KIND_CLIENT]
    assert attributes(call)["gen_ai.system"] == "litellm"
    traceparent = upstream.requests_to("/v1/messages")[-1].headers["traceparent"]
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert trace_id == call.trace_id.hex() and parent_id == call.span_id.hex()


def test_an_unreachable_upstream_ends_its_span_as_an_error(start_proxy: StartProxy, collector: Collector) -> None:
    proxy = start_proxy(otel_endpoint=collector.url, upstream_base_url=f"http://127.0.0.1:{free_port()}/v1",
                        optimizer="none")
    answer = httpx.post(proxy.base_url + "/chat/completions", timeout=30,
                        json={"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}]})
    proxy.stop()
    assert answer.status_code == 502
    (trace,) = collector.traces()
    call = trace["chat fake-model"]
    assert call.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert attributes(call)["error.type"] == "UpstreamUnreachable"
    assert "http.response.status_code" not in attributes(call)
