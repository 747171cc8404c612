"""OpenTelemetry traces over OTLP/HTTP (the optional ``[otel]`` extra): one trace per request, with spans
for the rewrite, its stages and the upstream call after the GenAI semantic conventions.

Built only when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``); otherwise this module's
OpenTelemetry imports never run and the gateway holds ``None`` where a ``Tracing`` would be. ``Tracing`` is
also the rewrite pipeline's ``StageTracer`` (``optimizer/stages.py``): the cache lookup, the optimizer call and
the guard become spans under ``bpo.rewrite``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from starlette.types import Scope

from optimizer.stages import NO_ATTRIBUTES, Attributes

log = logging.getLogger("bpo.tracing")

SERVICE_NAME = "bpo-proxy"
EXPORT_TIMEOUT_SECONDS = 5.0
EXPORT_DELAY_MS = 500


class Tracing:
    """A tracer of our own (no global provider), its batch exporter, and the W3C propagator."""

    def __init__(self, endpoint: str, include_text: bool, on_export_failure: Callable[[], None]) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.include_text = include_text
        # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; ours is only the default name.
        self.provider = TracerProvider(resource=Resource({"service.name": SERVICE_NAME}).merge(Resource.create()))
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT_SECONDS)
        self.provider.add_span_processor(BatchSpanProcessor(cast(Any, _Counted(exporter, on_export_failure)),
                                                            schedule_delay_millis=EXPORT_DELAY_MS))
        self.tracer = self.provider.get_tracer("bpo-proxy")
        self.propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def request_span(self, scope: Scope) -> Iterator[Any]:
        """The trace's root: one SERVER span per HTTP request, whichever path dispatches it."""
        from opentelemetry.trace import SpanKind

        method, path = scope["method"], scope["path"]
        with self.tracer.start_as_current_span(f"{method} {path}", kind=SpanKind.SERVER, attributes={
                "http.request.method": method, "url.path": path}) as span:
            yield span

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, Any], client: bool = False) -> Iterator[Any]:
        from opentelemetry.trace import SpanKind

        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        with self.tracer.start_as_current_span(name, kind=kind, attributes=_clean(attributes)) as span:
            yield span

    def start(self, name: str, attributes: Attributes = NO_ATTRIBUTES, client: bool = False) -> SpanStage:
        """A span begun under the current one, without becoming current itself; ends with ``SpanStage.end``."""
        from opentelemetry.trace import SpanKind

        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return SpanStage(self.tracer.start_span(name, kind=kind, attributes=_clean(attributes)))

    @contextlib.contextmanager
    def current(self, stage: SpanStage) -> Iterator[None]:
        """``stage``'s span as the current one (``traceparent`` is injected from it), not ended on exit."""
        from opentelemetry.trace import use_span

        with use_span(stage.span, end_on_exit=False):
            yield

    def inject(self, headers: dict[str, str]) -> None:
        """``traceparent`` (and ``tracestate``) of the current span, into the upstream's request headers."""
        self.propagator.inject(headers)

    async def close(self) -> None:
        import asyncio

        await asyncio.to_thread(self.provider.shutdown)  # flushes what is left; bounded by the export timeout


class SpanStage:
    """One span as a pipeline ``Stage``: ended once, with attributes and, for a failure, an error status."""

    __slots__ = ("ended", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.ended = False

    def end(self, attributes: Attributes = NO_ATTRIBUTES, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if attributes:
            self.span.set_attributes(_clean(attributes))
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            # The class only: an exception's text may quote the prompt or the provider's answer.
            self.span.set_attribute("error.type", type(error).__name__)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.end()


def annotate(span: Any, attributes: Mapping[str, Any]) -> None:
    span.set_attributes(_clean(attributes))


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry rejects None values; drop them rather than log a warning per request."""
    return {k: v for k, v in attributes.items() if v is not None}


class _Counted:
    """The exporter, counting failed exports: tracing fails open, a down collector never fails a request."""

    def __init__(self, inner: Any, on_failure: Callable[[], None]) -> None:
        self.inner, self.on_failure = inner, on_failure

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
        except Exception:  # fail open (rule: tracing never fails a request), counted below
            log.warning("trace export failed", exc_info=False)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.on_failure()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


def build_tracing(endpoint: str | None, include_text: bool, on_export_failure: Callable[[], None]) -> Tracing | None:
    if not endpoint:
        return None
    try:
        return Tracing(endpoint, include_text, on_export_failure)
    except ImportError as exc:
        raise RuntimeError("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                           "pip install 'bpo-proxy[otel]'") from exc
