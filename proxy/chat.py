"""Serving one chat completion: decide, rewrite, forward, and account for it."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from optimizer.cache import tenant_of
from optimizer.pipeline import RewritePipeline
from proxy.ab import ArmAssigner, ArmDecision
from proxy.budget import wants_usage, with_usage_requested, without_usage_chunk
from proxy.clients import CLIENT, ClientContext, Meter
from proxy.disconnect import OPTIMIZER, UPSTREAM, ClientGone, ClientWatch
from proxy.errors import ProxyError
from proxy.events import EventSink
from proxy.feedback import RecentRequests
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
from proxy.logs import AccessLog
from proxy.metrics import Metrics
from proxy.protocol import ChatRequest, parse_chat_request, read_body_from
from proxy.rewrite import find_last_user_turn, replace_user_text
from proxy.settings import Settings
from proxy.shadow import ShadowJudge

log = logging.getLogger("bpo.chat")

NOT_USER_TURN = "not-user-turn"
MAX_REMEMBERED_TARGETS = 1024  # model names are client input: the memo stays bounded
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Rewritten:
    """The body to send and how the rewrite went, for headers, metrics and events."""

    body: dict[str, Any] | None  # None: send the client's bytes as they came
    applied: bool
    reason: str | None
    cache: str
    optimizer: str
    optimized_text: str | None
    guard_rule: str | None = None  # the guard's rule, when it rejected the rewrite
    rejected_text: str | None = None  # the rejected rewrite: X-BPO-Debug and events with text only


def header_safe(value: str) -> str:
    """A header value from a name someone chose (a served model's, a path): percent-encoded past ASCII."""
    return value if value.isascii() and value.isprintable() else quote(value, safe="@:/._-+ ")


def request_id_for(headers: Mapping[str, str]) -> str:
    offered = headers.get("x-request-id", "")
    return offered if _CLIENT_REQUEST_ID.match(offered) else "req_" + secrets.token_hex(16)


def api_key_of(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("api-key", "").strip()
    return key or None


class ChatService:
    """``POST /v1/chat/completions``: the gateway's one rewriting route."""

    def __init__(self, settings: Settings, pipeline: RewritePipeline, http: HttpForwarder,
                 providers: LiteLLMForwarder, assigner: ArmAssigner, metrics: Metrics, events: EventSink,
                 recent: RecentRequests, shadow: ShadowJudge | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.http = http
        self.providers = providers
        self.assigner = assigner
        self.metrics = metrics
        self.events = events
        self.recent = recent
        self.shadow = shadow
        self.access_log = access_log
        self._targets: dict[str, Target] = {}

    def _target(self, model: str) -> Target:
        """``resolve_target``, remembered per model name: the settings never change while serving."""
        target = self._targets.get(model)
        if target is None:
            target = resolve_target(self.settings, model)  # raises for an unknown model: nothing kept
            if len(self._targets) >= MAX_REMEMBERED_TARGETS:
                self._targets.clear()
            self._targets[model] = target
        return target

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        arrived = time.perf_counter()
        # One pass over the raw headers; starlette's Headers scans the whole list on every lookup.
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = request_id_for(headers)
        watch = ClientWatch(receive)
        try:
            return await self._serve(receive, headers, request_id, arrived, scope.get(CLIENT), watch)
        except ProxyError as exc:
            response = exc.response()
            response.headers["x-request-id"] = request_id
            return response
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to forward
            return Response(status_code=499)
        except ClientGone as exc:  # gone while we optimized or waited for the upstream: both stopped
            self.metrics.client_disconnects.labels(stage=exc.stage).inc()
            return Response(status_code=499)
        finally:
            watch.close()  # before the response goes out: a stream listens for the disconnect itself

    async def _serve(self, receive: Receive, headers: dict[str, str], request_id: str,
                     arrived: float, client: ClientContext | None, watch: ClientWatch) -> Response:
        raw = await read_body_from(receive, headers.get("content-length"), self.settings.max_body_bytes)
        chat = parse_chat_request(raw, headers.get("content-type"))
        api_key = api_key_of(headers) if client is None else client.key.id
        decision = self.assigner.decide(chat.body, headers, api_key, client.key.optimize if client else "default")
        target = self._target(chat.model)
        meter = None if client is None else await self._admit(client, chat, decision)
        try:
            rewritten = await watch.guard(OPTIMIZER, self._rewrite(chat, decision, api_key))
        except ClientGone:
            if meter is not None:
                meter.settle(499, None)  # nothing was sent: nothing spent, the reservation released
            raise
        strip_usage = meter is not None and chat.stream and not wants_usage(chat.body)
        if strip_usage:  # spend needs the stream's usage: asked for here, taken out before the client sees it
            rewritten.body = with_usage_requested(chat.exact_body if rewritten.body is None else rewritten.body)
        debug = headers.get("x-bpo-debug", "").strip().lower() in ("1", "true", "yes", "on")
        exchange = Exchange()
        sent = time.perf_counter()

        def finish(done: Exchange) -> None:
            if meter is not None:
                meter.settle(done.status, done.usage)
            self._account(request_id, chat, decision, rewritten, done, arrived, sent, client)

        # Overhead so far; the relay adds nothing but byte copies after the upstream's headers arrive.
        extra = self._bpo_headers(request_id, decision, rewritten, debug, (sent - arrived) * 1000)
        try:
            response = await watch.guard(UPSTREAM, self._send(chat, rewritten, target, headers, exchange, extra,
                                                               finish))
        except ProxyError as exc:  # the upstream failed: still a chat completion, headed and counted
            exchange.status, exchange.error = exc.status, exc.message
            finish(exchange)
            failed = exc.response()
            failed.headers.update(extra)
            return failed
        except ClientGone:  # sent, and closed before it answered: counted, and in the events, as a 499
            exchange.status, exchange.error = 499, "the client disconnected before the upstream answered"
            finish(exchange)
            raise
        if strip_usage and isinstance(response, StreamingResponse):
            response.body_iterator = without_usage_chunk(response.body_iterator)
        return self._maybe_shadow(response, request_id, chat, decision, rewritten, headers)

    async def _admit(self, client: ClientContext, chat: ChatRequest, decision: ArmDecision) -> Meter:
        """The key's limits and budget, for this request's worst case: the body as sent, plus the longest
        rewrite the optimizer may add (in bytes, generously), plus the output it asks for."""
        rewrite = decision.optimize and self.pipeline.optimizer.status().state != "disabled"
        margin = 8 * self.settings.optimizer_max_new_tokens if rewrite else 0
        return await client.admit(chat.model, chat.body, len(chat.raw) + margin)

    async def _send(self, chat: ChatRequest, rewritten: Rewritten, target: Target, headers: Mapping[str, str],
                    exchange: Exchange, extra: dict[str, str], finish: Callable[[Exchange], None]) -> Response:
        if target.kind == "litellm":
            body = chat.exact_body if rewritten.body is None else rewritten.body
            return await self.providers.forward(target, {**body, "model": target.model}, exchange, extra, finish)
        payload = self._payload(chat, rewritten, target)
        url, params = chat_url(target)
        out_headers = upstream_headers(headers, target.api_key, azure=target.kind == "azure")
        out_headers["content-type"] = "application/json"
        return await self.http.forward("POST", url, out_headers, payload, exchange, extra, finish, params,
                                       stream=chat.stream)

    def _maybe_shadow(self, response: Response, request_id: str, chat: ChatRequest, decision: ArmDecision,
                      rewritten: Rewritten, headers: Mapping[str, str]) -> Response:
        """Rewritten treatment answers may be judged against control, after they reach the client."""
        if self.shadow is None or not self.shadow.enabled or not rewritten.applied or decision.override:
            return response
        return self.shadow.attach(response, request_id, chat.exact_body, headers)

    async def _rewrite(self, chat: ChatRequest, decision: ArmDecision, api_key: str | None) -> Rewritten:
        optimizer = self.pipeline.optimizer.identity
        if not decision.optimize:
            return Rewritten(None, False, decision.reason, "off", optimizer, None)
        if self.pipeline.optimizer.status().state == "disabled":  # --optimizer none
            return Rewritten(None, False, "disabled", "off", optimizer, None)
        turn = find_last_user_turn(chat.body["messages"])
        if turn is None:
            return Rewritten(None, False, NOT_USER_TURN, "off", optimizer, None)
        tenant = tenant_of(api_key) if self.settings.cache_per_tenant and api_key else ""
        outcome = await self.pipeline.run(turn.prompt.text, decision.mode, tenant)  # the whole turn: one call
        if not outcome.applied:
            return Rewritten(None, False, outcome.reason, outcome.cache, outcome.optimizer, None,
                             outcome.guard_rule, outcome.rejected)
        body = replace_user_text(chat.exact_body, turn, outcome.text)
        return Rewritten(body, True, None, outcome.cache, outcome.optimizer, outcome.text)

    @staticmethod
    def _payload(chat: ChatRequest, rewritten: Rewritten, target: Target) -> bytes:
        if rewritten.body is None and target.model == chat.model:
            return chat.raw  # untouched: the client's exact bytes
        body = chat.exact_body if rewritten.body is None else rewritten.body
        return encode_body(provider_body(body, target), orjson_safe=chat.read_by_orjson)

    def _bpo_headers(self, request_id: str, decision: ArmDecision, rewritten: Rewritten, debug: bool,
                     overhead_ms: float) -> dict[str, str]:
        out = {
            "x-request-id": request_id,
            "x-bpo-applied": "true" if rewritten.applied else "false",
            "x-bpo-cache": rewritten.cache,
            "x-bpo-optimizer": header_safe(rewritten.optimizer),
            "x-bpo-overhead-ms": f"{overhead_ms:.2f}",
        }
        if not rewritten.applied and rewritten.reason:
            out["x-bpo-reason"] = rewritten.reason
        if decision.arm is not None:
            out["x-bpo-arm"] = decision.arm
        if debug and rewritten.optimized_text is not None:
            out["x-bpo-optimized-prompt"] = quote(rewritten.optimized_text, safe="")
        if debug and rewritten.guard_rule is not None:  # what the guard refused, and by which rule
            out["x-bpo-guard-rule"] = rewritten.guard_rule
            if rewritten.rejected_text is not None:
                out["x-bpo-optimized-prompt"] = quote(rewritten.rejected_text, safe="")
        return out

    def _account(self, request_id: str, chat: ChatRequest, decision: ArmDecision, rewritten: Rewritten,
                 exchange: Exchange, arrived: float, sent: float, client: ClientContext | None = None) -> None:
        """Metrics and one event per request; runs when the response (or stream) is complete."""
        arm = decision.stats_arm
        total = time.perf_counter() - arrived
        self.metrics.observe_request(arm, rewritten.applied, rewritten.reason or "", total,
                                     exchange.upstream_seconds, exchange.usage)
        self.recent.remember(request_id, arm)
        if rewritten.guard_rule is not None and rewritten.cache != "hit":  # the rule, never the text
            log.info("guard rejected a rewrite: request_id=%s rule=%s", request_id, rewritten.guard_rule)
        if self.access_log is not None:  # never the prompt: it may hold personal data
            self.access_log.record({
                "request_id": request_id, "model": chat.model, "status": exchange.status, "arm": arm,
                "applied": rewritten.applied, "reason": rewritten.reason, "cache": rewritten.cache,
                "latency_ms": round(total * 1000, 2)})
        if self.events.enabled:
            event = self._event(request_id, chat, decision, rewritten, exchange, total, sent - arrived)
            if client is not None:
                event["key_name"] = client.name  # the key's name, never the key
            self.events.emit(event)

    def _event(self, request_id: str, chat: ChatRequest, decision: ArmDecision, rewritten: Rewritten,
               exchange: Exchange, total: float, overhead: float) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "request", "request_id": request_id, "time": time.time(),
            "experiment": self.settings.ab_experiment, "arm": decision.arm, "override": decision.override,
            "applied": rewritten.applied, "reason": rewritten.reason, "optimizer": rewritten.optimizer,
            "cache": rewritten.cache, "mode": decision.mode, "model": chat.model, "stream": chat.stream,
            "status": exchange.status, "latency_ms": round(total * 1000, 3),
            "upstream_ms": round(exchange.upstream_seconds * 1000, 3), "overhead_ms": round(overhead * 1000, 3),
            "usage": exchange.usage,
        }
        if exchange.error:
            event["error"] = exchange.error
        if rewritten.guard_rule is not None:
            event["guard_rule"] = rewritten.guard_rule
        if self.settings.events_include_text:
            turn = find_last_user_turn(chat.body["messages"])
            event["prompt"] = turn.prompt.text if turn else None
            event["optimized_prompt"] = rewritten.optimized_text
            if rewritten.rejected_text is not None:
                event["rejected_prompt"] = rewritten.rejected_text
        return event
