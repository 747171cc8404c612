"""Thin HTTP handlers; the logic lives in the services on ``app.state``."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from proxy.errors import NotFound, ProxyError
from proxy.feedback import feedback_endpoint
from proxy.forward import Exchange, passthrough_url, upstream_headers
from proxy.protocol import read_body
from proxy.shapes import MESSAGES, SHAPES, Shape, anthropic_error
from proxy.upstream_calls import messages_target

CHAT_COMPLETIONS = "/v1/chat/completions"
OWN_PREFIX = "/v1/bpo"  # the gateway's own /v1 namespace: never forwarded upstream


class RewritingRoute:
    """A rewriting route as a bare ASGI app, for requests that reach the router: ``proxy.app.Gateway`` serves
    the usual ones before it, and this one those under a root path (the app mounted in another).

    ``RewriteService.handle`` turns every ``ProxyError`` into a response itself; anything else still reaches
    the app's error middleware.
    """

    def __init__(self, shape: Shape) -> None:
        self.shape = shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response = await scope["app"].state.rewriting.handle(self.shape, scope, receive)
        await response(scope, receive, send)


async def list_models(request: Request) -> Response:
    """The configured routes, then (with an upstream base URL) the upstream's own models.

    When the upstream cannot list its models, the configured routes still answer; with none configured
    the upstream's error is the answer.
    """
    settings = request.app.state.settings
    data: list[dict[str, Any]] = [{"id": route.model_name, "object": "model", "created": 0,
                                   "owned_by": "bpo-proxy"} for route in settings.model_list]
    if not settings.upstream_base_url:
        return JSONResponse({"object": "list", "data": data})
    try:
        upstream = await _forward(request, "/v1/models")
    except ProxyError as exc:
        return JSONResponse({"object": "list", "data": data}) if data else exc.response()
    if upstream.status_code != 200:
        return JSONResponse({"object": "list", "data": data}) if data else upstream
    return _merge_models(data, bytes(upstream.body)) if data else upstream


def _merge_models(configured: list[dict[str, Any]], upstream_body: bytes) -> Response:
    try:
        upstream = orjson.loads(upstream_body).get("data", [])
    except (orjson.JSONDecodeError, AttributeError):
        upstream = []
    names = {m["id"] for m in configured}
    merged = configured + [m for m in upstream if isinstance(m, dict) and m.get("id") not in names]
    return JSONResponse({"object": "list", "data": merged})


class Passthrough(Route):
    """The ``/v1/*`` catch-all, which never takes the gateway's own ``/v1/bpo/*`` paths: a wrong method on
    ``/v1/bpo/feedback`` is a 405 here and an unknown ``/v1/bpo/`` path a 404, never a request upstream."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        if path == OWN_PREFIX or path.startswith(OWN_PREFIX + "/"):
            return Match.NONE, {}
        return super().matches(scope)


async def passthrough(request: Request) -> Response:
    """Any other ``/v1/*`` goes to the upstream unchanged (embeddings, files, responses, ...)."""
    # The raw path and query, as sent: decoding would turn %2F into a path separator and drop repeated keys.
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string", b"")
    try:
        return await _forward(request, raw_path.decode("latin-1"), query.decode("latin-1"))
    except ProxyError as exc:
        return exc.response()


async def anthropic_passthrough(request: Request) -> Response:
    """Other ``/v1/messages/*`` calls (``count_tokens``, batches) go to the Anthropic upstream unchanged: the
    body's model's ``anthropic/`` route (its base and key), else ``--anthropic-base-url``."""
    settings = request.app.state.settings
    try:
        body = await read_body(request, settings.max_body_bytes)
        target = messages_target(settings, _model_in(body))
        if target.kind != "anthropic":
            target = messages_target(settings, "")
        headers = upstream_headers(request.headers, None)
        if target.api_key:
            headers.pop("authorization", None)
            headers["x-api-key"] = target.api_key
        raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
        query: bytes = request.scope.get("query_string", b"")
        url = passthrough_url(f"{target.base_url}/v1", raw_path.decode("latin-1"), query.decode("latin-1"))
        response: Response = await request.app.state.http.forward(request.method, url, headers, body, Exchange(),
                                                                  {})
    except ProxyError as exc:
        return anthropic_error(exc)
    return response


def _model_in(body: bytes) -> str:
    try:
        model = orjson.loads(body).get("model") if body else None
    except (orjson.JSONDecodeError, AttributeError):
        model = None
    return model if isinstance(model, str) else ""


async def _forward(request: Request, raw_path: str, query: str = "") -> Response:
    settings = request.app.state.settings
    if not settings.upstream_base_url:
        raise NotFound(f"No upstream is configured for {request.url.path}; set --upstream-base-url.",
                       code="no_upstream")
    url = passthrough_url(settings.upstream_base_url, raw_path, query)
    body = await read_body(request, settings.max_body_bytes)
    headers = upstream_headers(request.headers, settings.upstream_api_key)
    # Any answer may be a stream here (files, responses, batches: the gateway does not read the body to know):
    # streams get the idle deadline, and a plain answer still the whole one.
    response: Response = await request.app.state.http.forward(request.method, url, headers, body, Exchange(), {},
                                                              stream=True)
    return response


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """503 while the optimizer loads; 200 once traffic is served (degraded: passing prompts through)."""
    state = request.app.state
    optimizer = state.optimizer.status()
    cache = state.cache.status()
    degraded = optimizer.state == "failed" or cache.get("state") not in (None, "ok", "off")
    status = "loading" if optimizer.state == "loading" else ("degraded" if degraded else "ready")
    body = {"status": status,
            "optimizer": {"state": optimizer.state, "name": optimizer.optimizer, "detail": optimizer.detail,
                          **({"speed": optimizer.speed} if optimizer.speed is not None else {})},
            "cache": cache}
    return JSONResponse(body, status_code=503 if status == "loading" else 200)


async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(registry.exposition(), media_type=registry.content_type)


def routes() -> list[BaseRoute]:
    return [
        *(Route(shape.path, RewritingRoute(shape), methods=["POST"]) for shape in SHAPES),
        Route(MESSAGES.path + "/{path:path}", anthropic_passthrough, methods=["GET", "POST", "DELETE"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/bpo/feedback", feedback_endpoint, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Passthrough("/v1/{path:path}", passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
