"""Admission from a lease: each process takes a slice of a key's limits from the store and admits from it.

A store round trip per request (a thread hop and a SQLite write transaction, or a Lua script over redis-py)
cost more than the rest of the fast path (``bench/README.md``, "Client keys"). So a process asks the store
for a *lease*: up to ``LEASE_MAX_REQUESTS`` requests like the one asking, charged to the key's rpm and tpm
and reserved against its budget in one atomic step (``proxy.limits.lease_count`` sizes it), and admits the
next requests from it without the store, until the lease runs out or ``LEASE_SECONDS`` pass.

What a lease keeps true:
- **The budget.** A lease's budget part is a reservation in the store, so "spend + open reservations stays
  within the budget" holds across replicas as before. A request takes its worst case from the lease; when it
  settles, its actual cost is charged and taken off the reservation, and the rest of its worst case goes
  back to the lease.
- **Sharing.** A lease holds at most a tenth (``LEASE_SHARE``) of what is free in each limited dimension, so
  replicas sharing a key get their turns; close to a limit a lease is one request, and admission is exactly
  the per-request rule.
- **Nothing unused is kept.** When a lease is replaced or expires, its unused requests and tokens go back
  to the key's buckets and its unused budget back to the store; its reservation closes when the last
  request admitted on it settles.
- **Revocation** through another replica is seen at its next lease, within ``LEASE_SECONDS``.
- **No waiting.** A lease in use is renewed in the background once ``LEASE_RENEW_AT`` of its life has
  passed, while it goes on admitting; only a key without a live lease (the first request, or one whose lease
  ran out) waits for the store.

What its requests spent, and what it gives back, the lease sums in its *account*; the settler
(``ClientGuard``) takes the accounts (``Leases.accounts``) and writes one settlement per lease per round.

Leases live in the event loop's thread and change only between awaits, so admitting from one needs no lock;
refilling one does (one store call per key at a time, however many requests wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

from proxy.keys import ClientKey
from proxy.keystore import KeyStoreError, Settlement
from proxy.limits import INVALID_KEY, LEASE_MAX_REQUESTS, Admission, Ask

log = logging.getLogger("bpo.leases")

LEASE_SECONDS: Final = 1.0
# A lease in use is renewed in the background once this share of its life has passed, so requests keep
# being admitted from it while the store grants the next one: a busy key never waits for a refill.
LEASE_RENEW_AT: Final = 0.75


class Lease:
    """What is left of one slice of a key's limits in this process, and what its requests did that the store
    has not been told yet (its *account*: summed per lease, written as one settlement)."""

    __slots__ = ("closed", "expires", "freed", "in_flight", "renew_at", "requests", "requests_delta", "reservation",
                 "retired", "spent", "tokens", "tokens_delta", "usd")

    def __init__(self, key: ClientKey, ask: Ask, admission: Admission, now: float) -> None:
        count = admission.granted
        self.reservation = admission.reservation
        self.requests = float(count) if key.rpm else math.inf
        self.tokens = float(min(ask.tokens, key.tpm) * count) if key.tpm else math.inf
        self.usd = ask.cost * count if key.max_budget_usd is not None else math.inf
        self.expires = now + LEASE_SECONDS
        self.renew_at = now + LEASE_SECONDS * LEASE_RENEW_AT
        self.in_flight = 0  # admitted requests holding part of the reservation, not yet settled
        self.retired = False
        # The account: spend, bucket corrections and reservation freed since it was last written.
        self.spent = self.tokens_delta = self.requests_delta = self.freed = 0.0
        self.closed = False  # the reservation is done with: the account deletes it

    def take(self, ask: Ask, tpm: int | None, now: float) -> bool:
        """Admit ``ask`` from this lease, if it is live and holds enough."""
        tokens = min(ask.tokens, tpm) if tpm else 0
        if self.retired or now >= self.expires or self.requests < 1 or self.tokens < tokens or self.usd < ask.cost:
            return False
        self.requests -= 1
        self.tokens -= tokens
        if ask.cost > 0:
            self.usd -= ask.cost
            self.in_flight += 1
        return True

    def retire(self) -> None:
        """No more requests on this lease: what it did not use goes back to the store with its account."""
        self.retired = True
        self.requests_delta -= self.requests if math.isfinite(self.requests) else 0.0
        self.tokens_delta -= self.tokens if math.isfinite(self.tokens) else 0.0
        self.freed += self.usd if math.isfinite(self.usd) else 0.0
        self.requests = self.tokens = self.usd = 0.0
        self.closed = self.reservation is not None and self.in_flight == 0

    def settle(self, reserved_cost: float, cost: float, tokens_delta: float) -> None:
        """A request admitted on this lease finished: its actual cost and token correction, into the account."""
        self.spent += cost
        self.tokens_delta += tokens_delta
        if reserved_cost <= 0:  # it held no part of the reservation
            return
        self.in_flight -= 1
        if not self.retired:  # the rest of its worst case is this lease's again; its cost leaves the reservation
            self.usd += reserved_cost - cost
            self.freed += cost
        elif self.in_flight == 0:  # the last request of a retired lease closes its reservation
            self.closed = True
        else:  # a retired lease: the request frees its whole worst case
            self.freed += reserved_cost

    def account(self, key: ClientKey) -> Settlement | None:
        """The account as one settlement for the store, and a fresh one begun (None: nothing to write)."""
        reservation = self.reservation
        settlement = Settlement(reservation, self.spent, self.tokens_delta if key.tpm else 0.0,
                                None if self.closed else self.freed, self.requests_delta if key.rpm else 0.0)
        self.spent = self.tokens_delta = self.requests_delta = self.freed = 0.0
        if self.closed:
            self.reservation = None  # deleted by this settlement: never named again
            self.closed = False
        if settlement.cost or settlement.tokens_delta or settlement.requests_delta or (
                reservation is not None and settlement.release != 0):
            return settlement
        return None


Grant = Callable[[ClientKey, Ask, int], Awaitable[Admission]]  # the store: a lease of up to n requests like one


class Leases:
    """This process's current lease per key. ``take`` admits locally or asks the store for a new lease;
    ``accounts`` hands what the leases' requests did to the settler."""

    def __init__(self, grant: Grant, on_account: Callable[[], None], clock: Callable[[], float]) -> None:
        self._grant = grant  # may raise the store's error (KeyStoreError)
        self._on_account = on_account  # a lease has an account to write: wakes the settler
        self._clock = clock
        self._current: dict[str, tuple[ClientKey, Lease]] = {}
        self._refilling: dict[str, asyncio.Lock] = {}
        self._renewals: set[asyncio.Task[None]] = set()
        self._unwritten: dict[Lease, ClientKey] = {}  # leases whose account the store has not seen

    def take_now(self, key: ClientKey, ask: Ask) -> Lease | None:
        """The current lease, if it admits ``ask``; None: a new lease is needed (``take``). A lease past
        ``LEASE_RENEW_AT`` of its life is renewed in the background meanwhile."""
        current = self._current.get(key.id)
        if current is None:
            return None
        lease, now = current[1], self._clock()
        if not lease.take(ask, key.tpm, now):
            return None
        if now >= lease.renew_at:
            lease.renew_at = math.inf  # one renewal a lease: a refused one is not asked again and again
            renewal = asyncio.get_running_loop().create_task(self._renew(key, ask, lease))
            self._renewals.add(renewal)
            renewal.add_done_callback(self._renewals.discard)
        return lease

    async def take(self, key: ClientKey, ask: Ask) -> Lease | Admission:
        """The lease ``ask`` was admitted on, or the store's refusal."""
        current_lease = self.take_now(key, ask)
        if current_lease is not None:
            return current_lease
        async with self._lock(key.id):
            current = self._current.get(key.id)  # another request may have refilled it meanwhile
            if current is not None and current[1].take(ask, key.tpm, self._clock()):
                return current[1]
            if current is not None:
                self._retire(key.id)
            admission = await self._grant(key, ask, LEASE_MAX_REQUESTS)
            if not admission.ok:
                return admission
            lease = self._install(key, ask, admission)
            taken = lease.take(ask, key.tpm, self._clock())
            assert taken, "a new lease holds at least the request that asked for it"
            return lease

    async def _renew(self, key: ClientKey, ask: Ask, lease: Lease) -> None:
        """The next lease while ``lease`` still admits requests; it replaces ``lease`` when granted. A refusal
        leaves ``lease`` serving until it runs out (then ``take`` asks, and refuses); a revoked key's lease
        is retired at once; a store fault is left to the next ``take``, which fails closed."""
        try:
            async with self._lock(key.id):
                current = self._current.get(key.id)
                if current is None or current[1] is not lease:  # refilled, expired or retired meanwhile
                    return
                admission = await self._grant(key, ask, LEASE_MAX_REQUESTS)
                still_current = self._current.get(key.id) is current
                if admission.ok and still_current:
                    self._retire(key.id)
                    self._install(key, ask, admission)
                elif admission.ok:  # retired while the store answered (revoked here, shutdown): given back
                    granted = Lease(key, ask, admission, self._clock())
                    granted.retire()
                    self._has_account(key, granted)
                elif admission.code == INVALID_KEY and still_current:
                    self._retire(key.id)
        except KeyStoreError as exc:  # the next take asks the store itself, and answers 503 if it still fails
            log.warning("renewing the lease of key %s failed: %s", key.name, exc)

    def _lock(self, key_id: str) -> asyncio.Lock:
        """One store call per key at a time: refills and renewals queue here."""
        lock = self._refilling.get(key_id)
        if lock is None:
            lock = self._refilling[key_id] = asyncio.Lock()
        return lock

    def _install(self, key: ClientKey, ask: Ask, admission: Admission) -> Lease:
        lease = Lease(key, ask, admission, self._clock())
        self._current[key.id] = (key, lease)
        asyncio.get_running_loop().call_later(LEASE_SECONDS, self._expire, key.id, lease)
        return lease

    def settle(self, key: ClientKey, lease: Lease, reserved_cost: float, cost: float, tokens_delta: float) -> None:
        lease.settle(reserved_cost, cost, tokens_delta)
        self._has_account(key, lease)

    def accounts(self, key_id: str | None = None) -> list[tuple[ClientKey, Settlement]]:
        """The leases' accounts (of one key, or all) as settlements to write; each lease starts a new one."""
        taken = []
        for lease, key in list(self._unwritten.items()):
            if key_id is None or key.id == key_id:
                del self._unwritten[lease]
                settlement = lease.account(key)
                if settlement is not None:
                    taken.append((key, settlement))
        return taken

    def _has_account(self, key: ClientKey, lease: Lease) -> None:
        if lease not in self._unwritten:
            self._unwritten[lease] = key
            self._on_account()

    def _expire(self, key_id: str, lease: Lease) -> None:
        """An idle lease gives back what it did not use, so other replicas can have it."""
        current = self._current.get(key_id)
        if current is not None and current[1] is lease:
            self._retire(key_id)

    def _retire(self, key_id: str) -> None:
        key, lease = self._current.pop(key_id)
        lease.retire()
        self._has_account(key, lease)

    async def close(self) -> None:
        """Shutdown: renewals in flight finish (what they are granted goes back), then every lease retires."""
        if self._renewals:
            await asyncio.gather(*self._renewals, return_exceptions=True)
        self.retire_all()

    def retire_all(self) -> None:
        """Revocation through this replica, and shutdown: no request is admitted on a lease taken before."""
        for key_id in list(self._current):
            self._retire(key_id)
