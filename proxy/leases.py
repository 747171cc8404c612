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

Leases live in the event loop's thread and change only between awaits, so admitting from one needs no lock;
refilling one does (one store call per key at a time, however many requests wait for it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Final

from proxy.keys import ClientKey
from proxy.keystore import Settlement
from proxy.limits import LEASE_MAX_REQUESTS, Admission, Ask

LEASE_SECONDS: Final = 1.0


class Lease:
    """What is left of one slice of a key's limits in this process."""

    __slots__ = ("expires", "in_flight", "requests", "reservation", "retired", "tokens", "usd")

    def __init__(self, key: ClientKey, ask: Ask, admission: Admission, expires: float) -> None:
        count = admission.granted
        self.reservation = admission.reservation
        self.requests = float(count) if key.rpm else math.inf
        self.tokens = float(min(ask.tokens, key.tpm) * count) if key.tpm else math.inf
        self.usd = ask.cost * count if key.max_budget_usd is not None else math.inf
        self.expires = expires
        self.in_flight = 0  # admitted requests holding part of the reservation, not yet settled
        self.retired = False

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

    def retire(self) -> Settlement | None:
        """No more requests on this lease: what to give back to the store (None: nothing)."""
        self.retired = True
        unused_requests = self.requests if math.isfinite(self.requests) else 0.0
        unused_tokens = self.tokens if math.isfinite(self.tokens) else 0.0
        unused_usd = self.usd if math.isfinite(self.usd) else 0.0
        self.requests = self.tokens = self.usd = 0.0
        close = self.reservation is not None and self.in_flight == 0
        if not (unused_requests or unused_tokens or unused_usd or close):
            return None
        return Settlement(self.reservation, 0.0, -unused_tokens, None if close else unused_usd, -unused_requests)

    def settle(self, reserved_cost: float, cost: float, tokens_delta: float) -> Settlement:
        """A request admitted on this lease finished: its actual cost and token correction for the store."""
        if reserved_cost <= 0:
            return Settlement(None, cost, tokens_delta)
        self.in_flight -= 1
        if not self.retired:  # the rest of its worst case is this lease's again
            self.usd += reserved_cost - cost
            return Settlement(self.reservation, cost, tokens_delta, cost)
        # A retired lease: the request frees its whole worst case; the last one closes the reservation.
        return Settlement(self.reservation, cost, tokens_delta, None if self.in_flight == 0 else reserved_cost)


class Leases:
    """This process's current lease per key. ``take`` admits locally or asks the store for a new lease."""

    def __init__(self, record: Callable[[ClientKey, Settlement], None], clock: Callable[[], float]) -> None:
        self._record = record  # queues a settlement for the store (``ClientGuard.record``)
        self._clock = clock
        self._current: dict[str, tuple[ClientKey, Lease]] = {}
        self._refilling: dict[str, asyncio.Lock] = {}

    async def take(self, key: ClientKey, ask: Ask,
                   lease_from_store: Callable[[int], Awaitable[Admission]]) -> Lease | Admission:
        """The lease ``ask`` was admitted on, or the store's refusal."""
        current = self._current.get(key.id)
        if current is not None and current[1].take(ask, key.tpm, self._clock()):
            return current[1]
        lock = self._refilling.get(key.id)
        if lock is None:
            lock = self._refilling[key.id] = asyncio.Lock()
        async with lock:
            current = self._current.get(key.id)  # another request may have refilled it meanwhile
            if current is not None and current[1].take(ask, key.tpm, self._clock()):
                return current[1]
            if current is not None:
                self._retire(key.id)
            admission = await lease_from_store(LEASE_MAX_REQUESTS)
            if not admission.ok:
                return admission
            lease = Lease(key, ask, admission, self._clock() + LEASE_SECONDS)
            taken = lease.take(ask, key.tpm, self._clock())
            assert taken, "a new lease holds at least the request that asked for it"
            self._current[key.id] = (key, lease)
            asyncio.get_running_loop().call_later(LEASE_SECONDS, self._expire, key.id, lease)
            return lease

    def settle(self, key: ClientKey, lease: Lease, reserved_cost: float, cost: float, tokens_delta: float) -> None:
        self._record(key, lease.settle(reserved_cost, cost, tokens_delta))

    def _expire(self, key_id: str, lease: Lease) -> None:
        """An idle lease gives back what it did not use, so other replicas can have it."""
        current = self._current.get(key_id)
        if current is not None and current[1] is lease:
            self._retire(key_id)

    def _retire(self, key_id: str) -> None:
        key, lease = self._current.pop(key_id)
        given_back = lease.retire()
        if given_back is not None:
            self._record(key, given_back)

    def retire_all(self) -> None:
        """Revocation through this replica, and shutdown: no request is admitted on a lease taken before."""
        for key_id in list(self._current):
            self._retire(key_id)
