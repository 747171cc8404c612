"""Each request shape's upstream call: where a model's requests go, and the URL, headers and body sent there.

Chat completions and the Responses API follow ``resolve_target`` (``model_list``, else
``--upstream-base-url``). Messages go to Anthropic's wire: ``anthropic/`` routes (their ``api_base``) and
models without a route (``--anthropic-base-url``) byte for byte; any other route through litellm's
Anthropic-format entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import Response

from proxy.context import RequestContext
from proxy.forward import (
    Exchange,
    HttpForwarder,
    Target,
    chat_url,
    encode_body,
    provider_body,
    resolve_target,
    upstream_headers,
)
from proxy.litellm_forward import LiteLLMForwarder
from proxy.settings import Settings
from proxy.tracing import Tracing

MAX_REMEMBERED_TARGETS = 1024  # model names are client input: the memo stays bounded
AZURE_RESPONSES_API_VERSION = "2025-04-01-preview"


def messages_target(settings: Settings, model: str) -> Target:
    """Where ``POST /v1/messages`` for ``model`` goes: Anthropic's wire, or litellm for other providers."""
    route = settings.route_for(model)
    if route is None:
        return Target("anthropic", model, _anthropic_base(settings.anthropic_base_url))
    params = dict(route.litellm_params)
    provider, _, provider_model = str(params.pop("model")).partition("/")
    api_key = params.pop("api_key", None)
    if provider == "anthropic" and provider_model:
        base = str(params.pop("api_base", None) or settings.anthropic_base_url)
        return Target("anthropic", provider_model, _anthropic_base(base), api_key, params)
    return Target("litellm", route.provider_model, None, api_key or settings.upstream_api_key, route.litellm_params)


def _anthropic_base(base: str) -> str:
    """The base without a trailing ``/v1``: both spellings are common in configs."""
    return base.rstrip("/").removesuffix("/v1")


class UpstreamCalls:
    """Builds and sends the upstream call of a request of any shape; targets are remembered per model."""

    def __init__(self, settings: Settings, http: HttpForwarder, providers: LiteLLMForwarder) -> None:
        self.settings = settings
        self.http = http
        self.providers = providers
        self._targets: dict[tuple[str, str], Target] = {}
        self.tracing: Tracing | None = None  # set by the app when traces are exported

    def target(self, route: str, model: str) -> Target:
        """``resolve_target`` (or ``messages_target``), remembered: the settings never change while serving."""
        key = (route, model)
        target = self._targets.get(key)
        if target is None:
            # Raises for an unknown model: nothing kept.
            target = messages_target(self.settings, model) if route == "messages" else resolve_target(
                self.settings, model)
            if len(self._targets) >= MAX_REMEMBERED_TARGETS:
                self._targets.clear()
            self._targets[key] = target
        return target

    async def send(self, ctx: RequestContext, extra: Mapping[str, str],
                   finish: Callable[[Exchange], None]) -> Response:
        target, request, body = ctx.target, ctx.request, ctx.rewritten.body
        if target.kind == "litellm":
            full = request.exact_body if body is None else body
            return await self.providers.forward(target, {**full, "model": target.model}, ctx.exchange, extra,
                                                finish, route=ctx.shape.route, trace_headers=self._trace_headers())
        url, params = self._url(ctx.shape.route, target)
        return await self.http.forward("POST", url, self._headers(target, ctx.headers), self._payload(ctx, target),
                                       ctx.exchange, extra, finish, params, stream=request.stream)

    async def send_own(self, route: str, body: Mapping[str, Any], headers: Mapping[str, str],
                       exchange: Exchange) -> Response:
        """A request of shape ``route`` the gateway asks for itself (the shadow judge's control answer): the
        same target, URL, headers and body rules as the client's own requests on that route, never streamed."""
        target = self.target(route, str(body["model"]))
        if target.kind == "litellm":
            return await self.providers.forward(target, {**body, "model": target.model}, exchange, {}, route=route)
        url, params = self._url(route, target)
        return await self.http.forward("POST", url, self._headers(target, headers),
                                       encode_body(_body_for(route, body, target)), exchange, {}, None, params)

    def _headers(self, target: Target, client_headers: Mapping[str, str]) -> dict[str, str]:
        headers = upstream_headers(client_headers, None if target.kind == "anthropic" else target.api_key,
                                   azure=target.kind == "azure")
        if target.kind == "anthropic" and target.api_key:  # the route's key replaces the client's
            headers.pop("authorization", None)
            headers["x-api-key"] = target.api_key
        headers["content-type"] = "application/json"
        if self.tracing is not None:
            self.tracing.inject(headers)  # W3C traceparent: the upstream's spans join this trace
        return headers

    def _trace_headers(self) -> dict[str, str] | None:
        """The W3C ``traceparent`` for a litellm call (which sends it as one of its ``extra_headers``)."""
        if self.tracing is None:
            return None
        headers: dict[str, str] = {}
        self.tracing.inject(headers)
        return headers

    @staticmethod
    def _url(route: str, target: Target) -> tuple[str, dict[str, str] | None]:
        if route == "chat":
            return chat_url(target)
        if route == "messages":
            return f"{target.base_url}/v1/messages", None
        if target.kind == "azure":
            version = str(target.params.get("api_version", AZURE_RESPONSES_API_VERSION))
            return f"{target.base_url}/openai/responses", {"api-version": version}
        return f"{target.base_url}/responses", None

    @staticmethod
    def _payload(ctx: RequestContext, target: Target) -> bytes:
        request, body = ctx.request, ctx.rewritten.body
        if body is None and target.model == request.model:
            return request.raw  # untouched: the client's exact bytes
        sent = request.exact_body if body is None else body
        return encode_body(_body_for(ctx.shape.route, sent, target), orjson_safe=request.read_by_orjson)


def _body_for(route: str, body: Mapping[str, Any], target: Target) -> Mapping[str, Any]:
    """``body`` as the target takes it on ``route``: the route's model name (chat on Azure names the deployment
    in the URL instead; Azure's Responses API names it in the body)."""
    if route == "chat":
        return provider_body(body, target)
    return body if body.get("model") == target.model else {**body, "model": target.model}
