"""The litellm path: providers that do not speak the request's wire format, answered back in it.

One entry point per request shape: ``litellm.acompletion`` (chat completions, answered as OpenAI JSON/SSE),
``litellm.aresponses`` (the Responses API) and ``litellm.anthropic.messages.acreate`` (Anthropic's Messages
API, for any provider): litellm's own translation, never a hand-made one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from optimizer.litellm_loader import load_litellm
from proxy.errors import (
    InvalidRequest,
    ProxyError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_event,
)
from proxy.forward import Exchange, Target, extract_usage

log = logging.getLogger("bpo.forward")

# Per request shape: the field holding the conversation, passed with model and stream as named arguments.
_CONVERSATION_FIELD = {"chat": "messages", "responses": "input", "messages": "messages"}
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


# litellm wraps a provider's failure two to five exceptions deep and names its own outermost one after the
# status it guessed (a refused connection and an unreadable answer both become "InternalServerError", 500).
# The cause chain tells what happened; classes are matched by name so the proxy imports no provider SDK.
_TIMEOUTS = frozenset({"TimeoutError", "TimeoutException", "APITimeoutError", "Timeout"})
_ANSWERED = frozenset({"HTTPStatusError"})  # the provider answered with this status
_UNREACHABLE = frozenset({"ConnectionError", "ConnectError", "TransportError", "APIConnectionError",
                          "ClientConnectionError"})
MAX_MESSAGE_CHARS = 1000


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _named(exceptions: list[BaseException], names: frozenset[str]) -> bool:
    return any(cls.__name__ in names for exc in exceptions for cls in type(exc).__mro__)


def _retry_after(chain: list[BaseException]) -> str | None:
    """The provider's Retry-After, from whichever exception in the chain kept its response."""
    for exc in chain:
        value = getattr(getattr(exc, "response", None), "headers", {}).get("retry-after")
        if value:
            return str(value)
    return None


def provider_message(exc: BaseException) -> str:
    """litellm's message for an error the provider answered: no traceback, no source path, bounded."""
    message = str(getattr(exc, "message", None) or exc).split("Traceback (most recent call last)")[0]
    lines = [line.strip() for line in message.splitlines() if not line.lstrip().startswith('File "')]
    return " ".join(line for line in lines if line)[:MAX_MESSAGE_CHARS] or "The provider refused the request."


def as_proxy_error(exc: BaseException, timeout: float) -> ProxyError:
    """A litellm failure as the fast path would answer it: 504, the provider's status, 502."""
    chain = _causes(exc)
    status = getattr(exc, "status_code", None)
    if _named(chain, _TIMEOUTS):
        return UpstreamTimeout(f"The provider did not answer within {timeout:g} s (--upstream-timeout).")
    if isinstance(status, int) and 400 <= status < 600 and (_named(chain[1:], _ANSWERED) or status < 500):
        # The provider's own answer (or litellm refusing the request before sending it): its status stays.
        retry_after = _retry_after(chain)
        return UpstreamError(status, provider_message(exc), code=type(exc).__name__,
                             headers={"retry-after": retry_after} if retry_after else None)
    if _named(chain[1:], _UNREACHABLE):
        return UpstreamUnreachable("The provider could not be reached.")
    # An answer litellm could not read. Its text may quote the provider's body (and so the prompt): only
    # the exception classes are logged.
    log.warning("unreadable provider answer: %s", " <- ".join(type(e).__name__ for e in chain))
    return UpstreamBadResponse("The provider's answer could not be read.")


def _entry_point(litellm: Any, route: str) -> Any:
    if route == "responses":
        return litellm.aresponses
    if route == "messages":
        return litellm.anthropic.messages.acreate
    return litellm.acompletion


def _sse_event(route: str, data: Any) -> bytes:
    """One streamed item in the shape's SSE framing: chat's bare ``data:`` lines, or named events."""
    if isinstance(data, bytes):  # already framed (litellm relays some providers' SSE as it came)
        return data
    if not isinstance(data, dict):
        data = data.model_dump(mode="json", exclude_none=True)
    if route == "chat":
        return b"data: " + orjson.dumps(data) + b"\n\n"
    return b"event: " + str(data.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _usage(payload: Any) -> dict[str, Any] | None:
    """``usage`` at the top (chat, Messages) or in ``response`` (Responses)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage") or (payload.get("response") or {}).get("usage")
    return usage if isinstance(usage, dict) else None


class LiteLLMForwarder:
    """Calls ``litellm.acompletion`` with the route's params; litellm is imported on first use.

    ``timeout`` (``--upstream-timeout``) bounds a plain answer and each silence inside a stream, as on the
    fast path; litellm's own default would be 6000 s. ``on_broken_stream`` as for ``HttpForwarder``.
    """

    def __init__(self, timeout: float, on_broken_stream: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout
        self._on_broken_stream = on_broken_stream

    async def forward(self, target: Target, body: Mapping[str, Any], exchange: Exchange,
                      extra_headers: Mapping[str, str],
                      on_done: Callable[[Exchange], None] | None = None, route: str = "chat",
                      trace_headers: Mapping[str, str] | None = None) -> Response:
        """``route``: the request's shape (chat, responses, messages), which picks litellm's entry point.
        ``trace_headers``: the W3C ``traceparent`` to send, next to the route's own ``extra_headers``."""
        litellm = load_litellm()
        stream = bool(body.get("stream"))
        conversation = _CONVERSATION_FIELD[route]
        kwargs = {k: v for k, v in body.items() if k not in ("model", "stream", conversation)}
        refused = sorted(field for field in kwargs if not client_settable(field, litellm))
        if refused:
            raise InvalidRequest(f"{', '.join(refused)}: provider settings cannot be set in a request; "
                                 "they belong to the gateway's model_list.",
                                 param=refused[0], code="unsupported_parameter")
        # No retries behind the client's back (its SDK retries, as on the fast path); a route may say otherwise.
        params = {"timeout": self.timeout, "num_retries": 0, "max_retries": 0,
                  **{k: v for k, v in target.params.items() if k != "model"}}
        if target.api_key:
            params["api_key"] = target.api_key
        if trace_headers:
            params["extra_headers"] = {**(params.get("extra_headers") or {}), **trace_headers}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await _entry_point(litellm, route)(
                    model=target.model, stream=stream, **{conversation: body.get(conversation)},
                    **{**kwargs, **params})
        except Exception as exc:  # translated at this one boundary into OpenAI-shaped errors
            raise as_proxy_error(exc, self.timeout) from exc
        exchange.status = 200
        exchange.upstream_seconds = time.perf_counter() - started
        if stream:
            return StreamingResponse(self._relay(result, exchange, on_done, route), media_type="text/event-stream",
                                     headers=dict(extra_headers))
        payload = result if isinstance(result, dict) else result.model_dump(mode="json")
        exchange.usage = _usage(payload)
        if on_done is not None:
            on_done(exchange)
        return Response(orjson.dumps(payload), media_type="application/json", headers=dict(extra_headers))

    async def _relay(self, chunks: Any, exchange: Exchange, on_done: Callable[[Exchange], None] | None,
                     route: str) -> AsyncIterator[bytes]:
        iterator = chunks.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):  # the longest silence, as on the fast path
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                framed = _sse_event(route, chunk)
                if b'"usage"' in framed:
                    exchange.usage = extract_usage(framed) or exchange.usage
                yield framed
            if route == "chat":
                yield b"data: [DONE]\n\n"
        except Exception as exc:  # mid-stream provider error: tell the client in-band, as OpenAI does
            yield self._broken(as_proxy_error(exc, self.timeout), exchange)
        finally:
            # A client that went away must cancel the provider's generation too, not leave it to the GC.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            if on_done is not None:
                on_done(exchange)

    def _broken(self, error: ProxyError, exchange: Exchange) -> bytes:
        reason = {UpstreamTimeout: "idle", UpstreamUnreachable: "cut"}.get(type(error), "error")
        exchange.error = error.message
        log.warning("provider stream broken (%s): %s", reason, error.message)
        if self._on_broken_stream is not None:
            self._on_broken_stream(reason)
        return error_event(error)
