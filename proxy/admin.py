"""Admin endpoints behind ``--admin-key``: ``POST /admin/optimizer/reload`` swaps the optimizer live;
``/admin/keys`` (``proxy/keys_admin.py``) manages client keys."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from optimizer.registry import SpecError
from optimizer.reload import ReloadableOptimizer, ReloadError
from proxy.errors import Forbidden, InvalidRequest, ProxyError, Unauthorized

log = logging.getLogger("bpo.admin")


class ReloadFailed(ProxyError):
    """The new optimizer did not load; the serving one is unchanged."""

    status = 422
    type = "invalid_request_error"
    code = "optimizer_load_failed"


class ReloadUnsupported(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "reload_unsupported"


def admin_routes(admin_key: str | None) -> list[BaseRoute]:
    """The admin routes, or none at all when no admin key is configured (the endpoints then 404)."""
    if not admin_key:
        return []

    async def reload_optimizer(request: Request) -> Response:
        try:
            return await _reload(request, admin_key)
        except ProxyError as exc:
            return exc.response()

    from proxy.keys_admin import key_routes

    return [Route("/admin/optimizer/reload", reload_optimizer, methods=["POST"]),
            *key_routes(check_admin_key, admin_key)]


def check_admin_key(request: Request, admin_key: str) -> None:
    """401 without a bearer key, 403 with the wrong one (compared in constant time)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Admin endpoints need 'Authorization: Bearer <admin key>'.")
    if not hmac.compare_digest(key.strip().encode(), admin_key.encode()):
        raise Forbidden("The admin key is not valid.", code="invalid_admin_key")


async def _reload(request: Request, admin_key: str) -> Response:
    check_admin_key(request, admin_key)
    spec = _requested_spec(await request.body())
    optimizer = request.app.state.optimizer
    if not isinstance(optimizer, ReloadableOptimizer):
        raise ReloadUnsupported("This gateway's optimizer cannot be reloaded.")
    try:
        result = await optimizer.reload(spec)
    except SpecError as exc:
        raise InvalidRequest(str(exc), param="optimizer", code="invalid_optimizer") from exc
    except ReloadError as exc:
        log.warning("admin reload failed, still serving %s: %s", optimizer.identity, exc)
        raise ReloadFailed(f"{exc}; still serving {optimizer.identity}", param="optimizer") from exc
    log.info("admin reload: %s -> %s", result.previous, result.current)
    return JSONResponse({"optimizer": result.current, "previous": result.previous, "spec": result.spec,
                         "state": result.status.state, "detail": result.status.detail})


def _requested_spec(body: bytes) -> str | None:
    """``{"optimizer": "hf:NEWDIR"}``, or an empty body for "the same spec again"."""
    if not body.strip():
        return None
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The body must be JSON, e.g. {\"optimizer\": \"hf:/models/bpo-v2\"}.") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("The body must be a JSON object.")
    spec = payload.get("optimizer")
    if spec is not None and (not isinstance(spec, str) or not spec.strip()):
        raise InvalidRequest("'optimizer' must be a spec string such as hf:DIR or remote:URL.",
                             param="optimizer", code="invalid_optimizer")
    return spec.strip() if spec else None
