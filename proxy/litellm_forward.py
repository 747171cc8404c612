"""The litellm path: providers that do not speak OpenAI's wire format, answered back as OpenAI JSON/SSE."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from optimizer.litellm_loader import load_litellm
from proxy.errors import InvalidRequest, UpstreamError, UpstreamUnreachable, error_body
from proxy.forward import Exchange, Target

log = logging.getLogger("bpo.forward")

# Fields the gateway passes to litellm as named arguments rather than provider extras.
_OWN_FIELDS = ("model", "messages", "stream")
# Call settings litellm reads from the same keyword arguments as the request's fields, beyond its own list
# (litellm.types.utils.all_litellm_params): endpoints and provider credentials. A client must never set them:
# {"api_base": "http://attacker"} would send the route's configured key there.
_PROVIDER_SETTINGS = frozenset({
    "api_base", "base_url", "api_key", "api_version", "organization", "project", "extra_headers", "headers",
    "timeout", "deployment_id", "azure_ad_token", "azure_ad_token_provider", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "aws_region_name", "aws_role_name", "aws_profile_name",
    "aws_web_identity_token", "aws_bedrock_runtime_endpoint", "aws_sts_endpoint", "vertex_project",
    "vertex_location", "vertex_credentials", "vertex_ai_project", "vertex_ai_location", "watsonx_region_name",
    "custom_llm_provider", "mock_response",
})


def client_settable(field: str, litellm: Any) -> bool:
    """Whether a request field may reach ``litellm.acompletion``: no litellm call setting, no credential."""
    lowered = field.lower()
    return not (field in _PROVIDER_SETTINGS or field in litellm.types.utils.all_litellm_params
                or lowered.startswith(("litellm", "aws_", "vertex_", "azure_"))
                or any(word in lowered for word in ("api_key", "secret", "token_file", "credential")))


def _as_proxy_error(exc: Exception) -> UpstreamError | UpstreamUnreachable:
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc)
    if isinstance(status, int) and 400 <= status < 600:
        headers = {}
        retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("retry-after")
        if retry_after:
            headers["retry-after"] = str(retry_after)
        return UpstreamError(status, message, code=type(exc).__name__, headers=headers)
    return UpstreamUnreachable(f"The provider call failed: {message}")


class LiteLLMForwarder:
    """Calls ``litellm.acompletion`` with the route's params; litellm is imported on first use."""

    async def forward(self, target: Target, body: Mapping[str, Any], exchange: Exchange,
                      extra_headers: Mapping[str, str],
                      on_done: Callable[[Exchange], None] | None = None) -> Response:
        litellm = load_litellm()
        stream = bool(body.get("stream"))
        kwargs = {k: v for k, v in body.items() if k not in _OWN_FIELDS}
        refused = sorted(field for field in kwargs if not client_settable(field, litellm))
        if refused:
            raise InvalidRequest(f"{', '.join(refused)}: provider settings cannot be set in a request; "
                                 "they belong to the gateway's model_list.",
                                 param=refused[0], code="unsupported_parameter")
        params = {k: v for k, v in target.params.items() if k != "model"}
        if target.api_key:
            params["api_key"] = target.api_key
        started = time.perf_counter()
        try:
            result = await litellm.acompletion(model=target.model, messages=body["messages"], stream=stream,
                                               **{**kwargs, **params})
        except Exception as exc:  # translated at this one boundary into OpenAI-shaped errors
            raise _as_proxy_error(exc) from exc
        exchange.status = 200
        exchange.upstream_seconds = time.perf_counter() - started
        if stream:
            return StreamingResponse(self._relay(result, exchange, on_done), media_type="text/event-stream",
                                     headers=dict(extra_headers))
        payload = result.model_dump(mode="json")
        exchange.usage = payload.get("usage")
        if on_done is not None:
            on_done(exchange)
        return Response(orjson.dumps(payload), media_type="application/json", headers=dict(extra_headers))

    async def _relay(self, chunks: Any, exchange: Exchange,
                     on_done: Callable[[Exchange], None] | None) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                data = chunk.model_dump(mode="json", exclude_none=True)
                if data.get("usage"):
                    exchange.usage = data["usage"]
                yield b"data: " + orjson.dumps(data) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # mid-stream provider error: tell the client in-band, as OpenAI does
            error = _as_proxy_error(exc)
            exchange.error = error.message
            log.warning("provider stream failed: %s", error.message)
            yield b"data: " + error_body(error.status, error.message, error.type, None, error.code) + b"\n\n"
        finally:
            # A client that went away must cancel the provider's generation too, not leave it to the GC.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            if on_done is not None:
                on_done(exchange)
