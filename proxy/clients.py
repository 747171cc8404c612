"""Client auth, limits and spend: the one check every ``/v1/*`` request passes (``ClientGuard.check``).

``proxy.app.Gateway`` runs the check ahead of both of its dispatch paths (the chat fast path and
Starlette's router), so no route can skip it. ``take_client_key`` takes the client's key headers out of the
request (nothing downstream can forward them); ``ClientGuard.admit_known`` passes the common request, whose
key was found valid moments ago, without an await; ``ClientGuard.check`` decides the rest (no key, a lookup
in the store). Either attaches a ``ClientContext`` to the scope and, for routes that do not meter
themselves, admits the request against the key's rpm and budget right there. The routes in
``METERED_PATHS`` know the model and the worst case of their request, so they admit it themselves with
``ClientContext.admit_now`` / ``admit_from_store`` (rpm, tpm and budget in one step) before forwarding.
``tests/proxy/test_clients_e2e.py`` sends no key, then a spent key, to every ``/v1`` route of the app (and the
fast path) and fails if any answers: a new route or dispatch path that skips the check, or a metered route
that forgets to admit, is caught there.

Key lookups are cached for ``--key-cache-seconds`` (default 10): a key revoked through this replica stops
working at once; through another replica, within that many seconds. A key with a rate limit or a budget
is admitted from this process's lease of its limits (``proxy/leases.py``), which the store grants in slices
and refuses for a revoked key, so for those revocation reaches every replica within ``LEASE_SECONDS`` (1 s).
A store fault fails closed: a request that needs the store (a key to look up, a lease to take) gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Scope

from proxy.budget import Price, Pricing, actual_tokens, worst_case_output
from proxy.errors import Forbidden, ProxyError, Unauthorized
from proxy.keys import ClientKey, KeySpecError, hash_key, key_from_spec, new_id, new_key, same_hash
from proxy.keystore import KeyRecord, KeyStore, KeyStoreError, Settlement, merge_settlements
from proxy.leases import Lease, Leases
from proxy.limits import BUDGET_EXCEEDED, RATE_LIMITED, Admission, Ask
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.shapes import SHAPES, error_for_path

log = logging.getLogger("bpo.clients")

CLIENT = "bpo.client"  # the scope entry that carries the request's ClientContext
# Routes that admit their own requests with the model and worst case known (``ClientContext.admit_now``): the
# rewriting routes (``RewriteService``).
METERED_PATHS = frozenset(shape.path for shape in SHAPES)
CLIENT_KEY_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key"})  # all taken out
MAX_CACHED_KEYS = 10_000
# The request's key, for spend the gateway causes on its behalf off the request's own code path (the llm:
# optimizer, the shadow judge): set by ``check`` in the request's task, inherited by the tasks it starts.
CURRENT_CLIENT: contextvars.ContextVar[ClientContext | None] = contextvars.ContextVar("bpo_client", default=None)
# How long the settler gathers finished requests before it writes them (one write per key). A write costs
# the event loop far more in a busy process than alone (a thread hop and SQLite's GIL handoffs, or a Redis
# script): at 0.05 s it was ~8 µs a request at ~3,000 requests/s (``bench/README.md``, "Client keys").
# Spend shows in ``GET /admin/keys`` that much later; admission never waits for it (a lease refill writes the
# key's queued settlements first), and budgets hold regardless (reservations).
SETTLE_INTERVAL = 0.5


class KeyStoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "key_store_unavailable"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = RATE_LIMITED


class BudgetExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = BUDGET_EXCEEDED


def charge_side_spend(model: str, usage: Mapping[str, Any] | None) -> None:
    """Charge a call the gateway made for the current request (optimizer, shadow judge) to its key."""
    context = CURRENT_CLIENT.get()
    tokens = actual_tokens(usage)
    if context is None or tokens is None:
        return
    price = context.guard.pricing.price(model)
    if price is not None:
        context.guard.record(context.key, Settlement(None, price.cost(*tokens), 0))


def take_client_key(scope: Scope) -> str | None:
    """The client's key, taken out of the request: ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` on
    ``/v1/messages`` (Anthropic's SDK sends that). Every client-key header goes, whatever it holds, so
    nothing downstream can forward one."""
    bearer = api_key = None
    kept = []
    for header in scope["headers"]:
        name = header[0]
        if name not in CLIENT_KEY_HEADERS:
            kept.append(header)
        elif name == b"authorization":
            scheme, _, token = header[1].decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and scope["path"].startswith("/v1/messages"):
            api_key = header[1].decode("latin-1").strip() or None
    scope["headers"] = kept
    return bearer or api_key


class Meter:
    """One admitted request's account, settled when its response is complete."""

    __slots__ = ("context", "lease", "price", "reserved_cost", "reserved_tokens")

    def __init__(self, context: ClientContext, price: Price | None, ask: Ask, lease: Lease | None) -> None:
        self.context = context
        self.price = price
        self.reserved_tokens, self.reserved_cost = ask.tokens, ask.cost
        self.lease = lease  # None: the key has no limits, nothing was reserved

    def settle(self, status: int, usage: Mapping[str, Any] | None) -> float:
        """Charge the actual cost (from the upstream's usage). With no usage on a success the worst case
        is charged: a stream cut short still spent tokens, and a budget must not be undercounted."""
        tokens = actual_tokens(usage)
        if status >= 400 or not status:
            cost, used = 0.0, 0
        elif tokens is None:
            cost, used = self.reserved_cost, self.reserved_tokens
        else:
            cost = self.price.cost(tokens[0], tokens[1]) if self.price else 0.0
            used = tokens[0] + tokens[1]
        key, guard = self.context.key, self.context.guard
        if cost:
            guard.metrics.key_spend(key.name, cost)
        if self.lease is None:
            guard.charge(key, cost)
        else:
            guard.leases.settle(key, self.lease, self.reserved_cost, cost, used - self.reserved_tokens)
        return cost


class ClientContext:
    """The authenticated key of one request, attached to its scope by ``ClientGuard.check``."""

    __slots__ = ("admitted", "guard", "key")

    def __init__(self, key: ClientKey, guard: ClientGuard, admitted: bool) -> None:
        self.key = key
        self.guard = guard
        self.admitted = admitted  # by the check itself; a metered route admits its request later

    @property
    def name(self) -> str:
        return self.key.name

    def admit_now(self, model: str, body: Mapping[str, Any], sent_bytes: int) -> Meter | None:
        """Admit a request for ``model`` without waiting, when the store has no part in it: a key without
        limits, or one whose lease in this process holds the request. None: ``admit_from_store`` decides.

        Raises 403 if the key may not use the model. ``sent_bytes`` bounds the prompt from above
        (``proxy/budget.py``).
        """
        key, guard = self.key, self.guard
        price, ask = self._ask(model, body, sent_bytes)
        lease = None
        if key.limited:
            lease = guard.leases.take_now(key, ask)
            if lease is None:
                return None
        guard.count(key.name, "ok")
        self.admitted = True
        return Meter(self, price, ask, lease)

    async def admit_from_store(self, model: str, body: Mapping[str, Any], sent_bytes: int) -> Meter:
        """Admit a request of a key with limits that needs a new lease from the store (``admit_now`` said
        so); 429 if over a limit or the budget."""
        price, ask = self._ask(model, body, sent_bytes)
        lease = await self.guard.admit(self.key, ask)
        self.admitted = True
        return Meter(self, price, ask, lease)

    def _ask(self, model: str, body: Mapping[str, Any], sent_bytes: int) -> tuple[Price | None, Ask]:
        """The model's price and the request's worst case; 403 when the key may not use the model."""
        key, guard = self.key, self.guard
        if not key.allows(model):
            guard.count(key.name, "model_not_allowed")
            raise Forbidden(f"This key may not use the model '{model}'.", param="model", code="model_not_allowed")
        price = guard.pricing.price(model)
        if price is None and key.max_budget_usd is not None:
            guard.count(key.name, "model_not_allowed")
            raise Forbidden(f"No price is known for '{model}', so this key's budget cannot cover it; set the "
                            "route's model_info input_cost_per_token and output_cost_per_token.", param="model",
                            code="model_not_allowed")
        output = worst_case_output(body, guard.settings.budget_default_max_tokens)
        return price, Ask(sent_bytes + output, price.cost(sent_bytes, output) if price else 0.0, guard.hold_seconds)


class ClientGuard:
    """Keys, their cache, admission and the background settler; one per app, built in the lifespan."""

    def __init__(self, settings: Settings, store: KeyStore, metrics: Metrics, pricing: Pricing,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.pricing = pricing
        self.clock = clock
        self.count = metrics.client_request  # (key name, outcome) of one check
        self.mode = settings.client_auth
        self.active = self.mode == "on"  # read on every request: "is client auth on now?"
        self.hold_seconds = settings.upstream_timeout + 60.0
        self._wake = asyncio.Event()  # something to write: the settler's next round
        self.leases = Leases(self._lease_from_store, self._wake.set, clock)
        # Lookups by key hash, valid or not, for --key-cache-seconds.
        self._cache: OrderedDict[str, tuple[ClientKey | None, float]] = OrderedDict()
        # Valid keys by the key as presented, for as long: the common request needs no hash. Keyed by a
        # secret, but a dict compares a key's text only after its hash (SipHash, seeded per process) matched,
        # so a lookup's time tells nothing of the keys held; only valid keys enter, so its size is theirs.
        self._recent: dict[str, tuple[ClientKey, float]] = {}
        self._config_keys = {key.key_hash: key for key in settings.keys}
        self._pending: dict[str, tuple[ClientKey, list[Settlement]]] = {}
        self._spend: dict[str, tuple[ClientKey, float]] = {}  # per key id, of keys without limits (``charge``)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._config_keys:
            await self._sync_config_keys()
        if self.mode == "auto":
            await self.refresh_auto()
        self._tasks.append(asyncio.create_task(self._settle_forever(), name="bpo-settle"))
        if self.mode == "auto" and not self.active:
            self._tasks.append(asyncio.create_task(self._watch_auto(), name="bpo-client-auth-auto"))

    async def close(self) -> None:
        await self.leases.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush(retries=3)

    async def _sync_config_keys(self) -> None:
        try:
            for key in self._config_keys.values():
                await self.store.put(key)
            await self.store.revoke_config_keys_except([k.id for k in self._config_keys.values()])
        except KeyStoreError as exc:  # the keys still authenticate from the config; limits fail closed
            log.error("could not write the config's keys to the key store: %s", exc)

    async def refresh_auto(self) -> None:
        """``--client-auth auto``: on as soon as a key exists (config or store); a store fault counts as on."""
        if self.mode != "auto" or self.active:
            return
        try:
            self.active = bool(self._config_keys) or await self.store.count() > 0
        except KeyStoreError as exc:
            log.error("client auth auto: key store unreachable, failing closed: %s", exc)
            self.active = True

    async def _watch_auto(self) -> None:
        """Another replica (or an earlier run) may create the first key: look again now and then."""
        while not self.active:
            await asyncio.sleep(self.settings.key_cache_seconds)
            await self.refresh_auto()

    def admit_known(self, scope: Scope, presented: str | None) -> bool:
        """``check`` without the store, for the common request: True when its key was found valid here
        within ``--key-cache-seconds`` and the request needs nothing from the store before its route (a
        metered route admits it itself; a key without limits), and then its context is attached. False:
        ``check`` decides (no key, an unknown or invalid one, a lookup or admission in the store)."""
        recent = self._recent.get(presented) if presented is not None else None
        if recent is None or self.clock() - recent[1] >= self.settings.key_cache_seconds:
            return False
        key = recent[0]
        admitted = scope["method"] != "POST" or scope["path"] not in METERED_PATHS
        if admitted:
            if key.limited:
                return False
            self.count(key.name, "ok")
        context = scope[CLIENT] = ClientContext(key, self, admitted)
        CURRENT_CLIENT.set(context)
        return True

    async def check(self, scope: Scope, presented: str | None) -> Response | None:
        """The one check on every ``/v1/*`` request while client auth is on, for the key ``presented`` (taken
        out of the request by ``take_client_key``); None lets the request go on."""
        path: str = scope["path"]
        try:
            if presented is None:
                self.count("", "invalid_key")
                raise Unauthorized("This gateway needs a client key: 'Authorization: Bearer <key>'.")
            key = await self.lookup(presented)
            if key is None:
                self.count("", "invalid_key")
                raise Unauthorized("The client key is not valid (unknown or revoked).")
            admitted = scope["method"] != "POST" or path not in METERED_PATHS
            if admitted:
                if key.limited:
                    await self.admit(key, Ask(0, 0.0, self.hold_seconds))
                else:
                    self.count(key.name, "ok")
            scope[CLIENT] = context = ClientContext(key, self, admitted)
            CURRENT_CLIENT.set(context)
        except ProxyError as exc:
            return error_for_path(path, exc)  # Anthropic's shape on /v1/messages, OpenAI's elsewhere
        return None

    async def lookup(self, presented: str) -> ClientKey | None:
        """The valid key ``presented`` is, from the config, the cache or the store; None: unknown or revoked."""
        digest = hash_key(presented)
        now = self.clock()
        configured = self._config_keys.get(digest)
        if configured is not None and same_hash(configured.key_hash, digest):
            self._remember_valid(presented, configured, now)
            return configured
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < self.settings.key_cache_seconds:
            return cached[0]
        try:
            key = await self.store.find(digest)
        except KeyStoreError as exc:
            log.error("key store unreachable, refusing the request: %s", exc)
            self.count("", "store_unavailable")
            raise KeyStoreUnavailable("The key store is unavailable; try again shortly.",
                                      headers={"retry-after": "1"}) from exc
        if key is not None and not same_hash(key.key_hash, digest):
            key = None
        self._cache[digest] = (key, now)
        self._cache.move_to_end(digest)
        if len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)
        if key is not None:
            self._remember_valid(presented, key, now)
        return key

    def _remember_valid(self, presented: str, key: ClientKey, now: float) -> None:
        """The next requests with this key find it without hashing it (``admit_known``)."""
        if len(self._recent) >= MAX_CACHED_KEYS:
            del self._recent[next(iter(self._recent))]  # the oldest
        self._recent[presented] = (key, now)

    def _forget_keys(self) -> None:
        """Every key is looked up again (a revocation here, or a key the store says is gone)."""
        self._cache.clear()
        self._recent.clear()

    async def admit(self, key: ClientKey, ask: Ask) -> Lease:
        """Admits ``ask`` from this process's lease of the key's limits, or from a new one the store grants
        (``proxy/leases.py``); raises the refusal. Returns the lease, to settle the request against."""
        try:
            taken = await self.leases.take(key, ask)
        except KeyStoreError as exc:
            log.error("key store unreachable, refusing the request: %s", exc)
            self.count(key.name, "store_unavailable")
            raise KeyStoreUnavailable("The key store is unavailable; try again shortly.",
                                      headers={"retry-after": "1"}) from exc
        if isinstance(taken, Admission):
            raise self._refusal(key, taken)
        self.count(key.name, "ok")
        return taken

    async def _lease_from_store(self, key: ClientKey, ask: Ask, most: int) -> Admission:
        """A new lease, once the store knows what this process's earlier requests of the key spent and gave
        back: its queued settlements go first, so a key near its limit is not refused for budget that a
        settled request here already freed."""
        queued = [settlement for _, settlement in self.leases.accounts(key.id)]
        pending = self._pending.pop(key.id, None)
        if pending is not None or queued:
            await self._write(key, [*(pending[1] if pending else []), *queued], retries=0)
        return await self.store.admit(key, ask, most)

    def _refusal(self, key: ClientKey, admission: Admission) -> ProxyError:
        headers = {"retry-after": str(admission.retry_after)} if admission.retry_after else {}
        if admission.code == RATE_LIMITED:
            self.count(key.name, "rate_limited")
            limits = ", ".join(f"{name} {value}" for name, value in (("rpm", key.rpm), ("tpm", key.tpm)) if value)
            return RateLimited(f"Rate limit reached for this key ({limits}); retry after "
                               f"{admission.retry_after} s.", headers=headers)
        if admission.code == BUDGET_EXCEEDED:
            self.count(key.name, "budget_exceeded")
            period = f" for this {key.budget_period} period" if key.budget_period else ""
            return BudgetExceeded(f"This key's budget of ${key.max_budget_usd:g}{period} is spent or "
                                  "reserved by requests in flight.", headers=headers)
        self._forget_keys()
        self.count("", "invalid_key")
        return Unauthorized("The client key is not valid (unknown or revoked).")

    def charge(self, key: ClientKey, cost: float) -> None:
        """A finished request of a key without limits: only its spend is written (summed per key)."""
        if cost:
            spend = self._spend
            if not spend:  # the first since the last write (while any is summed, the settler is awake)
                self._wake.set()
            summed = spend.get(key.id)
            spend[key.id] = (key, cost if summed is None else summed[1] + cost)

    def record(self, key: ClientKey, settlement: Settlement) -> None:
        """Queue a finished request's account for the store; the settler writes it within ``SETTLE_INTERVAL``."""
        if settlement.cost:
            self.metrics.key_spend(key.name, settlement.cost)
        if not (settlement.cost or (settlement.reservation and settlement.release != 0)
                or (key.tpm and settlement.tokens_delta) or (key.rpm and settlement.requests_delta)):
            return
        self._queue(key, settlement)
        self._wake.set()

    def _queue(self, key: ClientKey, settlement: Settlement) -> None:
        """``settlement`` goes with the next write of ``key``'s account."""
        self._pending.setdefault(key.id, (key, []))[1].append(settlement)

    async def _settle_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(SETTLE_INTERVAL)  # gathers a burst into one write per key
            self._wake.clear()
            await self._flush(retries=1)

    async def _flush(self, retries: int) -> None:
        spend, self._spend = self._spend, {}
        for key, cost in spend.values():
            self._queue(key, Settlement(None, cost, 0))
        for key, settlement in self.leases.accounts():
            self._queue(key, settlement)
        pending, self._pending = self._pending, {}
        for key, queued in pending.values():
            await self._write(key, queued, retries)

    async def _write(self, key: ClientKey, queued: list[Settlement], retries: int) -> None:
        items = merge_settlements(queued)  # once: a retry writes the same settlements (Redis skips repeats)
        for attempt in range(retries + 1):
            try:
                await self.store.settle(key, items)
                return
            except KeyStoreError as exc:
                log.error("could not settle %d request(s) of key %s (attempt %d): %s", len(items),
                          key.name, attempt + 1, exc)
                if attempt < retries:
                    await asyncio.sleep(0.2 * (attempt + 1))
        # Kept for the next round: spend is written late, never lost or written twice.
        self._pending.setdefault(key.id, (key, []))[1][:0] = items
        self._wake.set()

    async def flush(self) -> None:
        """Write every queued settlement now (tests and shutdown)."""
        await self._flush(retries=0)

    # The admin API's operations.

    async def create(self, spec: Mapping[str, Any]) -> tuple[ClientKey, str]:
        secret = new_key()
        key = key_from_spec({k: v for k, v in spec.items() if k not in ("key", "key_hash")},
                            key_hash=hash_key(secret), id=new_id(), source="api", where="body")
        await self.store.put(key)
        if self.mode == "auto" and not self.active:
            self.active = True
            log.info("client auth is now on: the first client key was created")
        return key, secret

    async def list_keys(self) -> list[KeyRecord]:
        return await self.store.list_keys()

    async def revoke(self, key_id: str) -> bool:
        revoked = await self.store.revoke(key_id)
        self._forget_keys()  # takes effect on this replica at once
        self.leases.retire_all()
        return revoked


__all__ = ["CLIENT", "METERED_PATHS", "ClientContext", "ClientGuard", "KeySpecError", "Meter"]
