"""Rate limits and budget reservations of one key: the admission rule, decided in one atomic step.

The rule (the SQLite store runs it in a transaction, the Redis store as the Lua script in
``proxy/keystore_redis.py``; both follow this module):

- rpm and tpm are leaky buckets: a level that drains at ``limit / 60`` per second. A request fits when the
  level plus what it asks for stays within the limit (a single ask larger than the limit asks for the whole
  limit, so a big request waits for an empty bucket instead of never fitting). tpm is charged the request's
  worst case and corrected to the upstream's reported tokens when the request settles.
- A budget holds the settled spend (of the current period, with ``budget_period``) plus every open
  reservation. A request fits when spend + open reservations + its own worst-case cost stays within
  ``max_budget_usd``; a key whose spend has reached its budget is refused even a free request. A
  reservation expires after ``hold`` seconds, so a replica that died mid-request cannot hold budget forever.
- A lease (``proxy/leases.py``) is the same step for ``n`` requests like the one asking, ``n`` from
  ``lease_count``: rpm and tpm are charged ``n`` times, ``n`` worst cases reserved in one reservation. What
  a lease does not use is given back later (negative bucket charges, a smaller reservation); a bucket that
  drained meanwhile ends where it would have been had the unused part never been charged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

RATE_LIMITED = "rate_limit_exceeded"
BUDGET_EXCEEDED = "budget_exceeded"
INVALID_KEY = "invalid_api_key"  # the key is unknown or revoked
WINDOW_SECONDS = 60.0


class Ask(NamedTuple):
    """What one request asks of its key before it is forwarded (a tuple: one is built per request)."""

    tokens: int  # worst-case tokens, for tpm (0 when unknown: only rpm applies)
    cost: float  # worst-case USD, reserved against the budget
    hold_seconds: float  # how long the reservation lives if it is never settled


@dataclass(frozen=True)
class Admission:
    """The store's answer: admitted with a reservation id, or refused with a code and Retry-After."""

    ok: bool
    code: str | None = None
    retry_after: int | None = None
    reservation: str | None = None
    granted: int = 1  # requests like the one asking that were admitted (a lease's size)


@dataclass
class Bucket:
    """A leaky bucket's stored state: its level at ``at`` (seconds)."""

    level: float = 0.0
    at: float = 0.0

    def drained(self, limit: int, now: float) -> float:
        rate = limit / WINDOW_SECONDS
        return max(0.0, self.level - max(0.0, now - self.at) * rate)

    def wait_for(self, limit: int, need: float, now: float) -> float | None:
        """Seconds until ``need`` fits, or None when it fits now."""
        level = self.drained(limit, now)
        need = min(need, float(limit))
        excess = level + need - limit
        return None if excess <= 1e-9 else excess / (limit / WINDOW_SECONDS)

    def add(self, limit: int, amount: float, now: float) -> None:
        """Charge ``amount`` (the caller caps a single request at the limit); a negative amount corrects an
        earlier charge (actual minus charged tokens, a lease's unused requests given back)."""
        self.level = max(0.0, self.drained(limit, now) + amount)
        self.at = now


def retry_after(seconds: float) -> int:
    """Retry-After in whole seconds, never 0 (an SDK would retry at once)."""
    return max(1, math.ceil(seconds))


def period_start(now: float, period_seconds: int, started: float) -> float:
    """The start of the budget period ``now`` falls in, given the one stored (0: none yet)."""
    if period_seconds <= 0:
        return 0.0
    if started <= 0 or now >= started + period_seconds:
        return now - (now - started) % period_seconds if started > 0 else now
    return started


# Leases (``proxy/leases.py``): a process admits from a slice of a key's limits taken in one store step.
LEASE_SHARE = 0.1  # a slice holds at most this share of what is free in each limited dimension
LEASE_MAX_REQUESTS = 10_000  # and at most this many requests


def lease_count(most: int, *free_and_need: tuple[float, float]) -> int:
    """How many requests like the one asking a slice may hold: at most ``most`` and at most ``LEASE_SHARE``
    of what is free in each limited dimension, given as (free, need per request); at least the one asking
    (the caller has checked that it fits). Close to a limit a slice is one request."""
    count = most
    for free, need in free_and_need:
        if need > 0:
            count = min(count, int(free * LEASE_SHARE / need))
    return max(1, count)
