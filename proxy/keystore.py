"""Where client keys and their spend live: the ``KeyStore`` seam, ``build_key_store``, and the SQLite store.

``--key-store sqlite:PATH`` (the default, ``sqlite:bpo-keys.db``) keeps keys, spend, rate-limit buckets and
open reservations in one SQLite file in WAL mode. Every admission and settlement is one ``BEGIN IMMEDIATE``
transaction, so ``bpo serve --workers N`` processes sharing the file never interleave a check and its
increment. Commits are ``synchronous=NORMAL``: a process crash or restart loses nothing committed; an
operating-system crash or power loss may lose the last transactions (SQLite's WAL guarantee).
``redis://`` (``proxy/keystore_redis.py``) is the choice for several replicas on several hosts.

The file is created by the first key written (``POST /admin/keys`` or the config's ``keys:``), so a gateway
that never uses keys leaves no file behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from optimizer.urls import redact_url
from proxy.keys import ClientKey, key_from_spec
from proxy.limits import (
    BUDGET_EXCEEDED,
    INVALID_KEY,
    RATE_LIMITED,
    Admission,
    Ask,
    Bucket,
    lease_count,
    period_start,
    retry_after,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL, spec TEXT NOT NULL,
    source TEXT NOT NULL, created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT PRIMARY KEY, spend REAL NOT NULL DEFAULT 0, period_spend REAL NOT NULL DEFAULT 0,
    period_start REAL NOT NULL DEFAULT 0, rpm_level REAL NOT NULL DEFAULT 0, rpm_at REAL NOT NULL DEFAULT 0,
    tpm_level REAL NOT NULL DEFAULT 0, tpm_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, cost REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (key_id, expires);
"""


class KeyStoreError(Exception):
    """The store cannot answer (unreachable, locked, corrupt): client auth fails closed on it."""


@dataclass(frozen=True)
class KeyRecord:
    """A key as the admin API lists it: the definition and what it has spent."""

    key: ClientKey
    spend_usd: float
    period_spend_usd: float
    revoked: float | None


_SETTLEMENTS = itertools.count()
_this_run = ""


def _new_run() -> None:
    global _this_run
    _this_run = f"{uuid.uuid4().hex[:16]}{os.getpid()}-"


_new_run()
os.register_at_fork(after_in_child=_new_run)  # a forked worker must not repeat its parent's ids


def settlement_id() -> str:
    """Unique across replicas, workers and restarts, without a random draw per settlement."""
    return f"{_this_run}{next(_SETTLEMENTS)}"


@dataclass(slots=True)  # not frozen: one is built per request, and a frozen dataclass costs several times as much
class Settlement:
    """A finished request's account: its reservation released, its actual cost and token correction."""

    reservation: str | None
    cost: float
    tokens_delta: float  # actual tokens minus the tokens charged at admission (tpm correction)
    # How much of the reservation this frees: None frees all of it (deletes it); a lease's requests free
    # their part and leave the rest to the lease (``proxy/leases.py``).
    release: float | None = None
    requests_delta: float = 0  # rpm correction (a lease's unused requests given back)
    # Set when it is queued for a write (``merge_settlements``): a retried write applies it once (Redis).
    id: str = ""


def merge_settlements(items: Sequence[Settlement]) -> list[Settlement]:
    """One settlement per reservation (and one for those without), each with its write id: a lease's many
    requests become one write. Freeing a whole reservation subsumes freeing parts of it.

    A settlement that has an id already was merged for a write that failed: it is kept as it is, so that if
    that write landed after all, Redis still applies it once.
    """
    merged: dict[str | None, Settlement] = {}
    written: list[Settlement] = []
    for item in items:
        if item.id:
            written.append(item)
            continue
        seen = merged.get(item.reservation)
        if seen is None:
            merged[item.reservation] = Settlement(item.reservation, item.cost, item.tokens_delta, item.release,
                                                  item.requests_delta, settlement_id())
            continue
        seen.cost += item.cost
        seen.tokens_delta += item.tokens_delta
        seen.requests_delta += item.requests_delta
        seen.release = None if seen.release is None or item.release is None else seen.release + item.release
    return [*written, *merged.values()]


class KeyStore(Protocol):
    """Keys, spend and admission state, shared by every process that opens the same store."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, key: ClientKey) -> None:
        """Create the key, or replace its definition (config keys on each start); its spend is kept."""
        ...

    async def find(self, key_hash: str) -> ClientKey | None:
        """The active (not revoked) key with this hash."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> bool:
        """True when an active key was revoked."""
        ...

    async def revoke_config_keys_except(self, keep: Sequence[str]) -> None:
        """Config keys no longer in the config stop working."""
        ...

    async def count(self) -> int:
        """Active keys (``--client-auth auto`` turns on when there is one)."""
        ...

    async def admit(self, key: ClientKey, ask: Ask, most: int = 1) -> Admission:
        """Admit ``ask``, and up to ``most`` requests like it as one lease (``limits.lease_count``): rpm, tpm
        and the budget's reservation are charged for all of them."""
        ...

    async def settle(self, key: ClientKey, settlements: Sequence[Settlement]) -> None: ...


def build_key_store(spec: str, namespace: str = "bpo") -> KeyStore:
    """``sqlite:PATH`` or ``redis://HOST:PORT/DB`` (keys under ``NAMESPACE:keys:``); validated with the settings."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from proxy.keystore_redis import RedisKeyStore  # only deployments with Redis pay for its import

        return RedisKeyStore(spec, namespace=f"{namespace}:keys")
    return SqliteKeyStore(spec.removeprefix("sqlite:"))


def reservation_id() -> str:
    return uuid.uuid4().hex


class SqliteKeyStore:
    """The embedded store; every call runs on one dedicated thread, off the event loop."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.clock = clock
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bpo-keystore")

    async def start(self) -> None:
        if os.path.exists(self.path):
            await self._run(self._open)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    async def _run(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def _existing(self) -> sqlite3.Connection | None:
        """The connection, opened if another process created the file since; None while there is none."""
        if self._db is None and os.path.exists(self.path):
            return self._open()
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def put(self, key: ClientKey) -> None:
        await self._run(lambda: self._put(key))

    def _put(self, key: ClientKey) -> None:
        db = self._open()
        spec = orjson.dumps(key.limits_json()).decode()
        with _transaction(db):
            db.execute("INSERT INTO keys (id, key_hash, name, spec, source, created, revoked) "
                       "VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (id) DO UPDATE SET key_hash = excluded.key_hash,"
                       " name = excluded.name, spec = excluded.spec, source = excluded.source, revoked = NULL",
                       (key.id, key.key_hash, key.name, spec, key.source, key.created))
            db.execute("INSERT OR IGNORE INTO usage (key_id) VALUES (?)", (key.id,))

    async def find(self, key_hash: str) -> ClientKey | None:
        return await self._run(lambda: self._find(key_hash))

    def _find(self, key_hash: str) -> ClientKey | None:
        db = self._existing()
        if db is None:
            return None
        row = db.execute("SELECT id, key_hash, name, spec, source, created FROM keys "
                         "WHERE key_hash = ? AND revoked IS NULL", (key_hash,)).fetchone()
        return None if row is None else _key_of(row)

    async def list_keys(self) -> list[KeyRecord]:
        return await self._run(self._list_keys)

    def _list_keys(self) -> list[KeyRecord]:
        db = self._existing()
        if db is None:
            return []
        rows = db.execute("SELECT k.id, k.key_hash, k.name, k.spec, k.source, k.created, u.spend, u.period_spend,"
                          " u.period_start, k.revoked FROM keys k LEFT JOIN usage u ON u.key_id = k.id "
                          "ORDER BY k.created").fetchall()
        now = self.clock()
        records = []
        for row in rows:
            key = _key_of(row[:6])
            current = period_start(now, key.period_seconds, row[8] or 0.0) == (row[8] or 0.0)
            records.append(KeyRecord(key, row[6] or 0.0, (row[7] or 0.0) if current else 0.0, row[9]))
        return records

    async def revoke(self, key_id: str) -> bool:
        return await self._run(lambda: self._revoke(key_id))

    def _revoke(self, key_id: str) -> bool:
        db = self._existing()
        if db is None:
            return False
        cursor = db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (self.clock(), key_id))
        return cursor.rowcount > 0

    async def revoke_config_keys_except(self, keep: Sequence[str]) -> None:
        await self._run(lambda: self._revoke_config(list(keep)))

    def _revoke_config(self, keep: list[str]) -> None:
        db = self._existing()
        if db is None:
            return
        marks = ",".join("?" * len(keep)) or "''"
        db.execute(f"UPDATE keys SET revoked = ? WHERE source = 'config' AND revoked IS NULL AND id NOT IN ({marks})",
                   (self.clock(), *keep))

    async def count(self) -> int:
        return await self._run(self._count)

    def _count(self) -> int:
        db = self._existing()
        if db is None:
            return 0
        return int(db.execute("SELECT count(*) FROM keys WHERE revoked IS NULL").fetchone()[0])

    async def admit(self, key: ClientKey, ask: Ask, most: int = 1) -> Admission:
        return await self._run(lambda: self._admit(key, ask, most))

    def _admit(self, key: ClientKey, ask: Ask, most: int = 1) -> Admission:
        db = self._existing()
        if db is None:
            raise sqlite3.OperationalError("no key store file (was it deleted?)")
        now = self.clock()
        with _transaction(db):
            row = db.execute("SELECT u.spend, u.period_spend, u.period_start, u.rpm_level, u.rpm_at, u.tpm_level,"
                             " u.tpm_at, k.revoked FROM usage u JOIN keys k ON k.id = u.key_id WHERE u.key_id = ?",
                             (key.id,)).fetchone()
            if row is None or row[7] is not None:
                return Admission(False, INVALID_KEY)
            state = _UsageRow(*row[:7])
            reserved = self._reserved(db, key.id, now, ask.cost)
            refused = state.refusal(key, ask, now, reserved)
            if refused is not None:
                return refused
            count = state.lease_count(key, ask, now, reserved, most)
            state.charge(key, ask, now, count)
            db.execute("UPDATE usage SET period_spend = ?, period_start = ?, rpm_level = ?, rpm_at = ?,"
                       " tpm_level = ?, tpm_at = ? WHERE key_id = ?", (*state.admission_columns(), key.id))
            reservation = None
            if key.max_budget_usd is not None and ask.cost > 0:
                reservation = reservation_id()
                db.execute("INSERT INTO reservations (id, key_id, cost, expires) VALUES (?, ?, ?, ?)",
                           (reservation, key.id, ask.cost * count, now + ask.hold_seconds))
            return Admission(True, reservation=reservation, granted=count)

    @staticmethod
    def _reserved(db: sqlite3.Connection, key_id: str, now: float, cost: float) -> float:
        if cost <= 0:
            return 0.0
        db.execute("DELETE FROM reservations WHERE key_id = ? AND expires <= ?", (key_id, now))
        total = db.execute("SELECT coalesce(sum(cost), 0) FROM reservations WHERE key_id = ?", (key_id,)).fetchone()
        return float(total[0])

    async def settle(self, key: ClientKey, settlements: Sequence[Settlement]) -> None:
        await self._run(lambda: self._settle(key, list(settlements)))

    def _settle(self, key: ClientKey, settlements: list[Settlement]) -> None:
        db = self._open()
        now = self.clock()
        with _transaction(db):
            row = db.execute("SELECT spend, period_spend, period_start, rpm_level, rpm_at, tpm_level, tpm_at "
                             "FROM usage WHERE key_id = ?", (key.id,)).fetchone()
            if row is None:
                return
            state = _UsageRow(*row)
            for item in settlements:
                state.settle(key, item, now)
                if item.reservation and item.release is None:
                    db.execute("DELETE FROM reservations WHERE id = ?", (item.reservation,))
                elif item.reservation and item.release:
                    db.execute("UPDATE reservations SET cost = max(0, cost - ?) WHERE id = ?",
                               (item.release, item.reservation))
            db.execute("UPDATE usage SET spend = ?, period_spend = ?, period_start = ?, rpm_level = ?, rpm_at = ?, "
                       "tpm_level = ?, tpm_at = ? WHERE key_id = ?",
                       (state.spend, state.period_spend, state.period_start, state.rpm.level, state.rpm.at,
                        state.tpm.level, state.tpm.at, key.id))


class _UsageRow:
    """One key's usage row, with the admission rule of ``proxy/limits.py`` applied to it."""

    def __init__(self, spend: float, period_spend: float, started: float, rpm_level: float, rpm_at: float,
                 tpm_level: float, tpm_at: float) -> None:
        self.spend, self.period_spend, self.period_start = spend, period_spend, started
        self.rpm, self.tpm = Bucket(rpm_level, rpm_at), Bucket(tpm_level, tpm_at)

    def _roll_period(self, key: ClientKey, now: float) -> None:
        start = period_start(now, key.period_seconds, self.period_start)
        if start != self.period_start:
            self.period_start, self.period_spend = start, 0.0

    def counted_spend(self) -> float:
        return self.period_spend if self.period_start > 0 else self.spend

    def refusal(self, key: ClientKey, ask: Ask, now: float, reserved: float) -> Admission | None:
        self._roll_period(key, now)
        waits = [w for w in (self.rpm.wait_for(key.rpm, 1, now) if key.rpm else None,
                             self.tpm.wait_for(key.tpm, ask.tokens, now) if key.tpm and ask.tokens else None)
                 if w is not None]
        if waits:
            return Admission(False, RATE_LIMITED, retry_after(max(waits)))
        budget = key.max_budget_usd
        if budget is not None:
            spent = self.counted_spend()
            if spent >= budget or spent + reserved + ask.cost > budget:
                wait = self.period_start + key.period_seconds - now if key.period_seconds else None
                return Admission(False, BUDGET_EXCEEDED, retry_after(wait) if wait is not None else None)
        return None

    def lease_count(self, key: ClientKey, ask: Ask, now: float, reserved: float, most: int) -> int:
        """How many requests like ``ask`` to admit at once (``proxy.limits.lease_count``)."""
        if most <= 1:
            return 1
        free = []
        if key.rpm:
            free.append((key.rpm - self.rpm.drained(key.rpm, now), 1.0))
        if key.tpm and ask.tokens:
            free.append((key.tpm - self.tpm.drained(key.tpm, now), float(min(ask.tokens, key.tpm))))
        if key.max_budget_usd is not None:
            free.append((key.max_budget_usd - self.counted_spend() - reserved, ask.cost))
        return lease_count(most, *free)

    def charge(self, key: ClientKey, ask: Ask, now: float, count: int = 1) -> None:
        if key.rpm:
            self.rpm.add(key.rpm, count, now)
        if key.tpm and ask.tokens:
            self.tpm.add(key.tpm, min(ask.tokens, key.tpm) * count, now)

    def admission_columns(self) -> tuple[float, ...]:
        return (self.period_spend, self.period_start, self.rpm.level, self.rpm.at, self.tpm.level, self.tpm.at)

    def settle(self, key: ClientKey, item: Settlement, now: float) -> None:
        self._roll_period(key, now)
        self.spend += item.cost
        self.period_spend += item.cost
        if key.tpm and item.tokens_delta:
            self.tpm.add(key.tpm, item.tokens_delta, now)
        if key.rpm and item.requests_delta:
            self.rpm.add(key.rpm, item.requests_delta, now)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken first, so no other process can read the
    same state between our check and our write."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _key_of(row: Sequence[Any]) -> ClientKey:
    key_id, key_hash, name, spec, source, created = row
    key = key_from_spec({**orjson.loads(spec), "name": name}, key_hash=key_hash, id=key_id,
                        source="config" if source == "config" else "api", where=f"key store: {key_id}")
    return dataclasses.replace(key, created=created)


def count_keys_now(spec: str, namespace: str = "bpo") -> int:
    """Active keys in the store, read synchronously before the server starts (the open-relay check).

    Raises ``KeyStoreError`` when the store cannot be read.
    """
    if spec.startswith(("redis://", "rediss://", "unix://")):
        import redis

        try:
            client = redis.Redis.from_url(spec, socket_timeout=5, socket_connect_timeout=5)
            with client:
                return int(client.scard(f"{namespace}:keys:active"))  # type: ignore[arg-type]
        except (redis.RedisError, OSError) as exc:
            raise KeyStoreError(f"key store {redact_url(spec)}: {exc}") from exc
    path = spec.removeprefix("sqlite:")
    if not os.path.exists(path):
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute("SELECT count(*) FROM keys WHERE revoked IS NULL").fetchone()[0])
    except sqlite3.Error as exc:
        raise KeyStoreError(f"key store {path}: {exc}") from exc
