"""The litellm path: providers that do not speak OpenAI's wire format, answered back as OpenAI JSON/SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from optimizer.litellm_loader import load_litellm
from proxy.errors import UpstreamError, UpstreamUnreachable, error_body
from proxy.forward import Exchange, Target

log = logging.getLogger("bpo.forward")

# Fields the gateway passes to litellm as named arguments rather than provider extras.
_OWN_FIELDS = ("model", "messages", "stream")


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
            if on_done is not None:
                on_done(exchange)
