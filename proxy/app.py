"""``create_app(settings)``: the Starlette application, its services built in the lifespan."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from optimizer.base import Optimizer, OptimizerOptions, wait_until_settled
from optimizer.cache import CacheOptions, build_cache
from optimizer.pipeline import RewritePipeline
from optimizer.reload import ReloadableOptimizer, install_sighup
from proxy.ab import ArmAssigner
from proxy.admin import admin_routes
from proxy.budget import Pricing
from proxy.clients import ClientGuard, charge_side_spend, take_client_key
from proxy.dashboard import dashboard_routes
from proxy.errors import ProxyError, error_response
from proxy.events import build_sink
from proxy.feedback import RecentRequests
from proxy.forward import HttpForwarder
from proxy.keystore import build_key_store
from proxy.litellm_forward import LiteLLMForwarder
from proxy.logs import AccessLog
from proxy.metrics import Metrics
from proxy.routes import routes
from proxy.serving import RewriteService
from proxy.settings import Settings
from proxy.shadow import ForwardingControlClient, ShadowJudge
from proxy.shapes import SHAPES
from proxy.tracing import Tracing, build_tracing
from proxy.upstream_calls import UpstreamCalls

log = logging.getLogger("bpo.app")

# Objects one chat completion holds while in flight: ~50 containers. With dozens of requests in flight the
# collector's default young generation (700) fills every few requests and each pass rescans live request
# state for nothing: a request leaves no reference cycle behind. 20,000 covers ~400 requests in flight.
GC_YOUNG_THRESHOLD = 20_000


class StartupError(RuntimeError):
    """The gateway cannot start as configured (e.g. --require-optimizer and the optimizer did not load)."""


def optimizer_options(settings: Settings, metrics: Metrics) -> OptimizerOptions:
    return OptimizerOptions(
        max_new_tokens=settings.optimizer_max_new_tokens,
        max_batch_size=settings.optimizer_max_batch_size,
        max_wait_ms=settings.optimizer_max_wait_ms,
        seed=settings.optimizer_seed,
        device=settings.optimizer_device,
        remote_model=settings.optimizer_model,
        request_timeout=settings.optimizer_timeout,
        api_key=settings.optimizer_api_key,
        on_batch=metrics.optimizer_batch_size.observe,
        measure_speed=True,
        on_usage=charge_side_spend,
    )


def cache_options(settings: Settings) -> CacheOptions:
    return CacheOptions(spec=settings.cache, ttl_seconds=settings.cache_ttl_seconds,
                        namespace=settings.cache_namespace, max_entries=settings.cache_max_entries,
                        max_bytes=settings.cache_max_bytes)


def settle_heap() -> None:
    """Once start-up is done: freeze what it built (modules, services: they live as long as the process) so
    full collections never rescan it, and size the young generation for a busy gateway.

    For the server process only (``bpo serve``): measured, the default settings cost ~20 µs of collector time
    per request at 32 connections (``bench/README.md``).
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def create_app(settings: Settings, *, server_process: bool = False) -> Starlette:
    """The gateway; ``server_process`` when it owns its process (``bpo serve``): then it tunes the collector."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Gateway) -> AsyncIterator[None]:
        state = app.state
        state.settings, state.metrics = settings, metrics
        # Reloadable: SIGHUP or POST /admin/optimizer/reload swaps the model without dropping requests.
        state.optimizer = ReloadableOptimizer(settings.optimizer, optimizer_options(settings, metrics))
        state.cache = build_cache(cache_options(settings), metrics.cache_event)
        state.events = build_sink(settings, metrics)
        state.http = HttpForwarder(settings.upstream_timeout, on_broken_stream=metrics.broken_stream)
        state.recent_requests = RecentRequests()
        state.key_store = build_key_store(settings.key_store, settings.cache_namespace)
        state.clients = app.clients = ClientGuard(settings, state.key_store, metrics, Pricing(settings))
        pipeline = RewritePipeline(
            state.optimizer, state.cache, timeout=settings.optimizer_timeout,
            max_chars=settings.max_prompt_chars,
            on_optimizer_seconds=lambda backend, seconds: metrics.optimizer_seconds.labels(backend).observe(seconds),
            on_fail_open=lambda component: metrics.fail_open.labels(component=component).inc())
        providers = LiteLLMForwarder(settings.upstream_timeout, on_broken_stream=metrics.broken_stream)
        upstream_calls = UpstreamCalls(settings, state.http, providers)
        state.shadow = ShadowJudge(settings, metrics, state.events, ForwardingControlClient(upstream_calls))
        state.access_log = AccessLog() if settings.access_log and settings.log_level in ("debug", "info") else None
        tracing = build_tracing(settings.otel_endpoint, settings.events_include_text,
                                lambda: metrics.fail_open.labels(component="tracing").inc())
        state.tracing = app.tracing = tracing
        state.rewriting = RewriteService(settings, pipeline, upstream_calls,
                                         ArmAssigner(settings), metrics, state.events, state.recent_requests,
                                         state.shadow, state.access_log)
        state.rewriting.tracing = state.rewriting.upstream.tracing = pipeline.stages = tracing
        async with contextlib.AsyncExitStack() as services:
            if tracing is not None:  # closed last: it flushes the spans of the last requests
                services.push_async_callback(tracing.close)
            # Started in order, closed in reverse: the shadow judge's verdicts still reach the events sink.
            for service in (state.key_store, state.clients, state.http, state.cache, state.events, state.shadow,
                            state.optimizer, state.access_log):
                if service is None:
                    continue
                await service.start()
                services.push_async_callback(service.close)
            if settings.require_optimizer:
                await _require(state.optimizer)
            services.callback(install_sighup(state.optimizer))
            if server_process:
                settle_heap()
            yield

    app = Gateway(routes=[*admin_routes(settings.admin_key), *dashboard_routes(settings), *routes()], lifespan=lifespan,
                  exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error,
                                      Exception: _unexpected})
    return app


# The rewriting routes by path: the hot ones, dispatched ahead of Starlette.
_REWRITING = {shape.path: shape for shape in SHAPES}


TRACED = "bpo.traced"  # scope key: this request already runs inside its trace span


class Gateway(Starlette):
    """The Starlette app, with ``POST`` on the rewriting routes (chat completions, responses, messages)
    dispatched before its middleware and router.

    The hot routes need neither: ``RewriteService.handle`` answers every error it expects in the route's
    shape, and anything else is answered here as ``_unexpected`` would. That saves two send wrappers, two
    exception layers and a route scan on every request (``bench/README.md``). Every other request, other
    methods on these paths included, goes through Starlette as before.

    Cross-cutting checks attach here, ahead of both paths, so no route can skip them: client auth, rate
    limits and budgets (``ClientGuard.check``) on every ``/v1/*`` request, and the request's trace span.
    """

    clients: ClientGuard | None = None  # set by the lifespan
    tracing: Tracing | None = None  # set by the lifespan when an OTLP endpoint is configured

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, _brief_startup_failure(send))
            return
        tracing = self.tracing
        if tracing is not None and scope["type"] == "http" and TRACED not in scope:
            # One trace per request, over both paths: the same dispatch again, inside the request's span.
            # Without tracing the dispatch below runs directly: no extra coroutine on the hot path.
            scope[TRACED] = True
            with tracing.request_span(scope):
                await self.__call__(scope, receive, send)
            return
        clients = self.clients
        if clients is not None and clients.active and scope["type"] == "http" and _api_path(scope).startswith("/v1/"):
            presented = take_client_key(scope)
            if not clients.admit_known(scope, presented):  # the common request (a known key) needs no await
                refused = await clients.check(scope, presented)
                if refused is not None:
                    await refused(scope, receive, send)
                    return
        shape = _REWRITING.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if shape is not None and not scope.get("root_path"):
            scope["app"] = self
            try:
                response = await self.state.rewriting.handle(shape, scope, receive)
            except Exception:
                log.exception("unhandled error on %s", shape.path)
                response = shape.error_response(ProxyError(UNEXPECTED, code="internal_error"))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _api_path(scope: Scope) -> str:
    """The path the routes match: under a root path (the app mounted in another), without it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def create_app_from_environment() -> Starlette:
    """The app of one worker process of ``bpo serve --workers N``: its settings come from ``BPO_*``."""
    from proxy.logs import configure_logging
    from proxy.settings import load_settings

    settings = load_settings({})
    configure_logging(settings.log_level)
    return create_app(settings, server_process=True)


def _brief_startup_failure(send: Send) -> Send:
    """Starlette reports a failed start-up as a whole traceback, which the server logs as one message; a
    :class:`StartupError` already says all there is to say, so the server logs that one line instead."""

    async def send_brief(message: Message) -> None:
        error = sys.exc_info()[1]  # Starlette sends the failure while it handles the exception
        if message["type"] == "lifespan.startup.failed" and isinstance(error, StartupError):
            message = {**message, "message": str(error)}
        await send(message)

    return send_brief


async def _require(optimizer: Optimizer) -> None:
    status = await wait_until_settled(optimizer)
    if status.state != "ready":
        raise StartupError(f"--require-optimizer: the optimizer did not load, so the gateway does not start: "
                           f"{status.detail}")


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (no such route, wrong method), in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          "invalid_request_error", code=code, headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return unexpected_error()


UNEXPECTED = "The gateway failed on this request; see its logs."


def unexpected_error() -> Response:
    return error_response(500, UNEXPECTED, "server_error", code="internal_error")
