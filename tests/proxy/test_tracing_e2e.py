"""OpenTelemetry end to end: the real gateway exports over OTLP/HTTP to a small collector on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.fakes.proxy_server import REPO
from tests.fakes.upstream import FakeUpstream, free_port

from .conftest import StartProxy

PROMPT = "Suggest a name for a bakery"


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
