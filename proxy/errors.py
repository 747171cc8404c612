"""The gateway's exception tree and OpenAI's error shape, produced at one boundary."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    """An error the client sees as OpenAI-shaped JSON with ``status``."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class UpstreamBadResponse(ProxyError):
    """The provider answered, but not in a form that could be read."""

    status = 502
    type = "upstream_error"
    code = "upstream_bad_response"


class UpstreamStreamBroken(ProxyError):
    """A stream that started well and then broke: sent in-band (``error_event``), the status already gone."""

    status = 502
    type = "upstream_error"
    code = "upstream_stream_broken"


class UpstreamError(ProxyError):
    """An error answered by a provider behind the litellm path; keeps the provider's status."""

    type = "upstream_error"

    def __init__(self, status: int, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status


def error_body(status: int, message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_event(error: ProxyError) -> bytes:
    """An SSE event that ends a stream the provider broke off: the official SDKs raise on it.

    openai's raise ``APIError`` on any event whose data holds ``error``; anthropic's on ``event: error``
    (its data carries ``"type": "error"``). A clean end after it is safe: no client takes it for an answer.
    """
    payload = {"type": "error", "error": {"message": error.message, "type": error.type, "param": error.param,
                                          "code": error.code}}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, type_, param, code), status_code=status,
                    media_type="application/json", headers=headers)
