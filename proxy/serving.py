"""Serving one request on a rewriting route, whatever its shape: decide, rewrite, forward, account for it.

Chat completions, the Responses API and Anthropic's Messages API differ only in their ``Shape``
(``proxy/shapes.py``: where the user turns are, the error body) and their upstream call
(``proxy/upstream_calls.py``); the A/B decision, skip policy, cache, optimizer, guard, history replay,
headers, metrics, events and shadow judge are this one pipeline.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from optimizer.cache import tenant_of
from optimizer.pipeline import Outcome, RewritePipeline
from optimizer.reasons import DISABLED, NOT_USER_TURN
from proxy.ab import ArmAssigner
from proxy.budget import wants_usage, with_usage_requested, without_usage_chunk
from proxy.clients import CLIENT, ClientContext
from proxy.context import RequestContext, Rewritten
from proxy.disconnect import OPTIMIZER, UPSTREAM, ClientGone, ClientWatch, DisconnectWatcher
from proxy.errors import ProxyError
from proxy.events import EventSink
from proxy.feedback import RecentRequests
from proxy.forward import Exchange
from proxy.logs import AccessLog
from proxy.metrics import Metrics
from proxy.protocol import read_body_from
from proxy.rewrite import UserTurn
from proxy.settings import Settings
from proxy.shadow import ShadowJudge
from proxy.shapes import Shape
from proxy.skip import Candidate, SkipPolicy
from proxy.tracing import Tracing, annotate
from proxy.upstream_calls import UpstreamCalls

log = logging.getLogger("bpo.serving")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def header_safe(value: str) -> str:
    """A header value from a name someone chose (a served model's, a path): percent-encoded past ASCII."""
    return value if value.isascii() and value.isprintable() else quote(value, safe="@:/._-+ ")


def request_id_for(headers: Mapping[str, str]) -> str:
    offered = headers.get("x-request-id", "")
    return offered if _CLIENT_REQUEST_ID.match(offered) else "req_" + secrets.token_hex(16)


def exchange_attributes(exchange: Exchange) -> dict[str, Any]:
    """The upstream span's outcome after the GenAI conventions: status and token usage, when known."""
    usage = exchange.usage or {}
    return {"http.response.status_code": exchange.status or None,  # 0: no answer came
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens", usage.get("output_tokens"))}


def api_key_of(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else (
        headers.get("api-key", "") or headers.get("x-api-key", "")).strip()
    return key or None


class RewriteService:
    """The rewriting routes (``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/messages``)."""

    def __init__(self, settings: Settings, pipeline: RewritePipeline, upstream: UpstreamCalls,
                 assigner: ArmAssigner, metrics: Metrics, events: EventSink, recent: RecentRequests,
                 shadow: ShadowJudge | None = None, access_log: AccessLog | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.upstream = upstream
        self.assigner = assigner
        self.metrics = metrics
        self.disconnects = DisconnectWatcher()
        self.events = events
        self.recent = recent
        self.shadow = shadow
        self.access_log = access_log
        self.skip = SkipPolicy(settings)
        self.replay_history = settings.rewrite_history == "on"
        self.tracing: Tracing | None = None  # set by the app when traces are exported

    async def handle(self, shape: Shape, scope: Scope, receive: Receive) -> Response:
        arrived = time.perf_counter()
        # One pass over the raw headers; starlette's Headers scans the whole list on every lookup.
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = request_id_for(headers)
        watch = self.disconnects.watch(receive)
        try:
            return await self._serve(shape, receive, headers, request_id, arrived, scope.get(CLIENT), watch)
        except ProxyError as exc:
            response = shape.error_response(exc)
            response.headers["x-request-id"] = request_id
            return response
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to forward
            return Response(status_code=499)
        except ClientGone as exc:  # gone while we optimized or waited for the upstream: both stopped
            self.metrics.client_disconnects.labels(stage=exc.stage).inc()
            return Response(status_code=499)
        finally:
            watch.close()  # before the response goes out: a stream listens for the disconnect itself

    async def _serve(self, shape: Shape, receive: Receive, headers: dict[str, str], request_id: str,
                     arrived: float, client: ClientContext | None, watch: ClientWatch) -> Response:
        raw = await read_body_from(receive, headers.get("content-length"), self.settings.max_body_bytes)
        request = shape.parse(raw, headers.get("content-type"))
        api_key = api_key_of(headers) if client is None else client.key.id
        decision = self.assigner.decide(request.body, headers, api_key, client.key.optimize if client else "default")
        target = self.upstream.target(shape.route, request.model)
        ctx = RequestContext(shape, request_id, headers, arrived, request, api_key, decision, target, client)
        if client is not None:
            sent_bytes = self._sent_bytes(ctx)
            meter = client.admit_now(request.model, request.body, sent_bytes)  # no await on the common path
            ctx.meter = meter if meter is not None else await client.admit_from_store(request.model, request.body,
                                                                                      sent_bytes)
        try:
            with watch.stage(OPTIMIZER):
                ctx.rewritten = await (self._rewrite(ctx) if self.tracing is None
                                       else self._traced_rewrite(ctx, self.tracing))
        except ClientGone:
            if ctx.meter is not None:
                ctx.meter.settle(499, None)  # nothing was sent: nothing spent, the reservation released
            raise
        # Spend needs a chat stream's usage: asked for here, taken out before the client sees it. The other
        # shapes' streams always carry it.
        strip_usage = (ctx.meter is not None and shape.route == "chat" and request.stream
                       and not wants_usage(request.body))
        if strip_usage:
            ctx.rewritten.body = with_usage_requested(ctx.rewritten.body or request.exact_body)
        ctx.sent = time.perf_counter()
        # Overhead so far; the relay adds nothing but byte copies after the upstream's headers arrive.
        extra = self._bpo_headers(ctx)
        try:
            with watch.stage(UPSTREAM):
                response = await (self.upstream.send(ctx, extra, lambda done: self._finish(ctx))
                                  if self.tracing is None else self._traced_call(ctx, self.tracing, extra))
        except ProxyError as exc:  # the upstream failed: still this route's answer, headed and counted
            ctx.exchange.status, ctx.exchange.error = exc.status, exc.message
            self._finish(ctx)
            failed = shape.error_response(exc)
            failed.headers.update(extra)
            return failed
        except ClientGone:  # sent, and closed before it answered: counted, and in the events, as a 499
            ctx.exchange.status, ctx.exchange.error = 499, "the client disconnected before the upstream answered"
            self._finish(ctx)
            raise
        if strip_usage and isinstance(response, StreamingResponse):
            response.body_iterator = without_usage_chunk(response.body_iterator)
        return self._maybe_shadow(response, ctx)

    async def _traced_rewrite(self, ctx: RequestContext, tracing: Tracing) -> Rewritten:
        """The rewrite as a span: its cache outcome, the optimizer, the guard's verdict; text only if allowed."""
        with tracing.span("bpo.rewrite", {"gen_ai.request.model": ctx.request.model, "bpo.arm": ctx.decision.arm,
                                          "bpo.mode": ctx.decision.mode}) as span:
            rewritten = await self._rewrite(ctx)
            annotate(span, {"bpo.applied": rewritten.applied, "bpo.reason": rewritten.reason,
                            "bpo.cache": rewritten.cache, "bpo.optimizer": rewritten.optimizer,
                            "bpo.guard.verdict": "accepted" if rewritten.applied else rewritten.guard_rule})
            if tracing.include_text:
                annotate(span, {"bpo.optimized_prompt": rewritten.optimized_text,
                                "bpo.rejected_prompt": rewritten.rejected_text})
            return rewritten

    async def _traced_call(self, ctx: RequestContext, tracing: Tracing, extra: dict[str, str]) -> Response:
        """The upstream call as a CLIENT span, current while it is sent (``traceparent`` goes out from it).

        It ends when the exchange does: a plain answer's, or a stream's last chunk, so a streamed usage
        (the final SSE event's) is on it too."""
        span = tracing.start(f"chat {ctx.target.model}", {"gen_ai.operation.name": "chat",
                                                          "gen_ai.request.model": ctx.target.model,
                                                          "gen_ai.system": ctx.target.kind}, client=True)

        def finish(exchange: Exchange) -> None:
            span.end(exchange_attributes(exchange))
            self._finish(ctx)

        try:
            with tracing.current(span):
                return await self.upstream.send(ctx, extra, finish)
        except BaseException as exc:  # refused, failed or cancelled before an answer: ended here
            span.end(exchange_attributes(ctx.exchange), error=exc)
            raise

    def _sent_bytes(self, ctx: RequestContext) -> int:
        """What bounds the prompt the key is charged for (with the output it asks for, the request's worst
        case): the body as sent, plus the longest rewrite the optimizer may add (in bytes, generously)."""
        rewrite = ctx.decision.optimize and self.pipeline.optimizer.status().state != "disabled"
        return len(ctx.request.raw) + (8 * self.settings.optimizer_max_new_tokens if rewrite else 0)

    def _finish(self, ctx: RequestContext) -> None:
        """Once the response (or stream) is complete: the key's spend, then metrics and the event."""
        if ctx.meter is not None:
            ctx.meter.settle(ctx.exchange.status, ctx.exchange.usage)
        self._account(ctx)

    def _maybe_shadow(self, response: Response, ctx: RequestContext) -> Response:
        """Rewritten treatment answers may be judged against control, after they reach the client (every
        shape: the judge replays the request through the shape's upstream call and reads its answers)."""
        if self.shadow is None or not self.shadow.enabled or not ctx.rewritten.applied or ctx.decision.override:
            return response
        return self.shadow.attach(response, ctx.shape, ctx.request_id, ctx.request.exact_body, ctx.headers)

    async def _rewrite(self, ctx: RequestContext) -> Rewritten:
        optimizer = self.pipeline.optimizer.identity
        if not ctx.decision.optimize:
            return Rewritten(None, False, ctx.decision.reason, "off", optimizer, None)
        if self.pipeline.optimizer.status().state == "disabled":  # --optimizer none
            return Rewritten(None, False, DISABLED, "off", optimizer, None)
        tenant = tenant_of(ctx.api_key) if self.settings.cache_per_tenant and ctx.api_key else ""
        body = ctx.request.body
        earlier = ctx.shape.earlier_turns(body) if self.replay_history else None
        rewrites = await self._replayed_history(earlier, ctx, tenant) if earlier else []
        replayed = len(rewrites)
        turn = ctx.shape.newest_turn(body)
        outcome = None
        if turn is not None:  # one optimizer call for the whole turn, unless a skip rule says no
            outcome = self._skipped(ctx, turn) or await self.pipeline.run(turn.prompt.text, ctx.decision.mode,
                                                                           tenant)
        if turn is not None and outcome is not None and outcome.applied:
            rewrites.append((turn, outcome.text))
        new_body = ctx.shape.put_back(ctx.request.exact_body, rewrites) if rewrites else None
        if outcome is None or not outcome.applied:
            reason = NOT_USER_TURN if turn is None else (outcome.reason if outcome else None)
            cache = outcome.cache if outcome else "off"
            return Rewritten(new_body, False, reason, cache, outcome.optimizer if outcome else optimizer, None,
                             outcome.guard_rule if outcome else None, outcome.rejected if outcome else None,
                             replayed)
        return Rewritten(new_body, True, None, outcome.cache, outcome.optimizer, outcome.text,
                         history_replayed=replayed)

    def _skipped(self, ctx: RequestContext, turn: UserTurn) -> Outcome | None:
        """The newest turn's outcome when a skip rule keeps it from the optimizer."""
        text = turn.prompt.text
        if len(text) > self.pipeline.max_chars:  # the pipeline answers too-long, for free
            return None
        key_rules = ctx.client.key.skip_rules if ctx.client is not None else None
        skipped = self.skip.first_match(Candidate(text, ctx.shape.json_schema(ctx.request.body)),
                                        ctx.request.model, key_rules)
        return None if skipped is None else Outcome(text, False, skipped, "off", self.pipeline.optimizer.identity)

    async def _replayed_history(self, earlier: list[UserTurn], ctx: RequestContext,
                                tenant: str) -> list[tuple[UserTurn, str]]:
        """Earlier user turns with a cached, applied rewrite under this optimizer: (turn, rewrite) pairs."""
        rewrites = []
        for turn in earlier:
            rewrite = await self.pipeline.recall(turn.prompt.text, ctx.decision.mode, tenant)
            if rewrite is not None:
                rewrites.append((turn, rewrite))
        return rewrites

    def _bpo_headers(self, ctx: RequestContext) -> dict[str, str]:
        rewritten = ctx.rewritten
        out = {
            "x-request-id": ctx.request_id,
            "x-bpo-applied": "true" if rewritten.applied else "false",
            "x-bpo-cache": rewritten.cache,
            "x-bpo-optimizer": header_safe(rewritten.optimizer),
            "x-bpo-overhead-ms": f"{(ctx.sent - ctx.arrived) * 1000:.2f}",
        }
        if not rewritten.applied and rewritten.reason:
            out["x-bpo-reason"] = rewritten.reason
        if ctx.decision.arm is not None:
            out["x-bpo-arm"] = ctx.decision.arm
        if rewritten.history_replayed:
            out["x-bpo-history-replayed"] = str(rewritten.history_replayed)
        debug = ctx.headers.get("x-bpo-debug", "").strip().lower() in ("1", "true", "yes", "on")
        if debug and rewritten.optimized_text is not None:
            out["x-bpo-optimized-prompt"] = quote(rewritten.optimized_text, safe="")
        if debug and rewritten.guard_rule is not None:  # what the guard refused, and by which rule
            out["x-bpo-guard-rule"] = rewritten.guard_rule
            if rewritten.rejected_text is not None:
                out["x-bpo-optimized-prompt"] = quote(rewritten.rejected_text, safe="")
        return out

    def _account(self, ctx: RequestContext) -> None:
        """Metrics and one event per request; runs when the response (or stream) is complete."""
        arm, rewritten, exchange = ctx.decision.stats_arm, ctx.rewritten, ctx.exchange
        total = time.perf_counter() - ctx.arrived
        self.metrics.observe_request(arm, rewritten.applied, rewritten.reason or "", total,
                                     exchange.upstream_seconds, exchange.usage, ctx.shape.route)
        self.recent.remember(ctx.request_id, arm)
        if rewritten.guard_rule is not None and rewritten.cache != "hit":  # the rule, never the text
            log.info("guard rejected a rewrite: request_id=%s rule=%s", ctx.request_id, rewritten.guard_rule)
        if self.access_log is not None:  # never the prompt: it may hold personal data
            self.access_log.record({
                "request_id": ctx.request_id, "route": ctx.shape.route, "model": ctx.request.model,
                "status": exchange.status, "arm": arm, "applied": rewritten.applied, "reason": rewritten.reason,
                "cache": rewritten.cache, "latency_ms": round(total * 1000, 2)})
        if self.events.enabled:
            self.events.emit(self._event(ctx, exchange, total))

    def _event(self, ctx: RequestContext, exchange: Exchange, total: float) -> dict[str, Any]:
        rewritten, decision = ctx.rewritten, ctx.decision
        event: dict[str, Any] = {
            "type": "request", "request_id": ctx.request_id, "time": time.time(), "route": ctx.shape.route,
            "experiment": self.settings.ab_experiment, "arm": decision.arm, "override": decision.override,
            "applied": rewritten.applied, "reason": rewritten.reason, "optimizer": rewritten.optimizer,
            "cache": rewritten.cache, "mode": decision.mode, "model": ctx.request.model,
            "stream": ctx.request.stream, "status": exchange.status, "latency_ms": round(total * 1000, 3),
            "upstream_ms": round(exchange.upstream_seconds * 1000, 3),
            "overhead_ms": round((ctx.sent - ctx.arrived) * 1000, 3), "usage": exchange.usage,
            "history_replayed": rewritten.history_replayed,
        }
        if exchange.error:
            event["error"] = exchange.error
        if rewritten.guard_rule is not None:
            event["guard_rule"] = rewritten.guard_rule
        if ctx.client is not None:
            event["key_name"] = ctx.client.name  # the key's name, never the key
        if self.settings.events_include_text:
            turn = ctx.shape.newest_turn(ctx.request.body)
            event["prompt"] = turn.prompt.text if turn else None
            event["optimized_prompt"] = rewritten.optimized_text
            if rewritten.rejected_text is not None:
                event["rejected_prompt"] = rewritten.rejected_text
        return event
