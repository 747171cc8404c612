"""``--key-store redis://``: client keys, spend and limits shared by every replica through one Redis.

Admission and settlement are Lua scripts, so the check and the increment are one atomic step however many
replicas ask at once (the rule is ``proxy/limits.py``'s). The scripts read Redis's own clock (``TIME``), so
replicas whose clocks disagree still share one window. Each key's state sits under one hash tag
(``bpo:keys:{ID}:...``), so the scripts also run on a Redis Cluster. Durability is Redis's: run it with
``appendonly yes`` (deploy/ does) so a Redis restart keeps keys and spend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from optimizer.urls import redact_url
from proxy.keys import ClientKey, key_from_spec
from proxy.keystore import KeyRecord, KeyStoreError, Settlement, reservation_id, settlement_id
from proxy.limits import LEASE_SHARE, Admission, Ask

T = TypeVar("T")
NAMESPACE = "bpo:keys"
REDIS_FAULTS = (RedisError, OSError, asyncio.TimeoutError)

_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(v) return tonumber(v) or 0 end
local function fmt(v) return string.format('%.17g', v) end
local function drained(level, at, limit)
  local l = level - math.max(0, now - at) * limit / 60
  if l < 0 then return 0 end
  return l
end
local function roll(pstart, pspend, period)
  if period <= 0 then return pstart, pspend end
  if pstart <= 0 then return now, 0 end
  if now >= pstart + period then return now - ((now - pstart) % period), 0 end
  return pstart, pspend
end
"""

# KEYS: definition, usage, reservations. ARGV: rpm, tpm, budget (-1: none), period seconds, tokens, cost,
# hold seconds, reservation id, most requests to admit at once, lease share. Returns {admitted, code,
# retry-after seconds, requests admitted} (``proxy.limits.lease_count`` says how many).
ADMIT = _CLOCK + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked') == 1 then
  return {0, 'invalid_api_key', 0}
end
local rpm, tpm, budget, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, cost, hold = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local u = redis.call('HMGET', KEYS[2], 'spend', 'period_spend', 'period_start', 'rpm_level', 'rpm_at',
                     'tpm_level', 'tpm_at')
local spend, pstart, pspend = num(u[1]), num(u[3]), num(u[2])
pstart, pspend = roll(pstart, pspend, period)
local wait, rl, tl = 0, 0, 0
if rpm > 0 then
  rl = drained(num(u[4]), num(u[5]), rpm)
  local excess = rl + 1 - rpm
  if excess > 1e-9 then wait = math.max(wait, excess * 60 / rpm) end
end
if tpm > 0 and tokens > 0 then
  tl = drained(num(u[6]), num(u[7]), tpm)
  local excess = tl + math.min(tokens, tpm) - tpm
  if excess > 1e-9 then wait = math.max(wait, excess * 60 / tpm) end
end
if wait > 0 then return {0, 'rate_limit_exceeded', math.max(1, math.ceil(wait))} end
local most, share = tonumber(ARGV[9]), tonumber(ARGV[10])
local n = most
local function fit(free, need) if need > 0 then n = math.min(n, math.floor(free * share / need)) end end
if rpm > 0 then fit(rpm - rl, 1) end
if tpm > 0 and tokens > 0 then fit(tpm - tl, math.min(tokens, tpm)) end
if budget >= 0 then
  local counted = spend
  if period > 0 then counted = pspend end
  local reserved = 0
  if cost > 0 then
    local open = redis.call('HGETALL', KEYS[3])
    for i = 1, #open, 2 do
      local c, e = string.match(open[i + 1], '^([^:]+):([^:]+)$')
      if tonumber(e) <= now then redis.call('HDEL', KEYS[3], open[i]) else reserved = reserved + tonumber(c) end
    end
  end
  if counted >= budget or counted + reserved + cost > budget then
    local w = 0
    if period > 0 then w = math.max(1, math.ceil(pstart + period - now)) end
    return {0, 'budget_exceeded', w}
  end
  fit(budget - counted - reserved, cost)
  n = math.max(1, n)
  if cost > 0 then redis.call('HSET', KEYS[3], ARGV[8], fmt(cost * n) .. ':' .. fmt(now + hold)) end
end
n = math.max(1, n)
if rpm > 0 then redis.call('HSET', KEYS[2], 'rpm_level', fmt(rl + n), 'rpm_at', fmt(now)) end
if tpm > 0 and tokens > 0 then
  redis.call('HSET', KEYS[2], 'tpm_level', fmt(tl + math.min(tokens, tpm) * n), 'tpm_at', fmt(now))
end
redis.call('HSET', KEYS[2], 'period_start', fmt(pstart), 'period_spend', fmt(pspend))
return {1, '', 0, n}
"""

# KEYS: usage, reservations, settled ids. ARGV: rpm, tpm, period seconds, then (settlement id, reservation id
# or '', cost, tokens delta, release ('': the whole reservation), requests delta)... A settlement already
# applied (a retry after a timeout whose first try landed) is skipped: its id stays in the settled set for a day.
SETTLE = _CLOCK + """
local rpm, tpm, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 86400)
local u = redis.call('HMGET', KEYS[1], 'spend', 'period_spend', 'period_start', 'tpm_level', 'tpm_at',
                     'rpm_level', 'rpm_at')
local spend, pstart, pspend = num(u[1]), num(u[3]), num(u[2])
pstart, pspend = roll(pstart, pspend, period)
local tl, rl = num(u[4]), num(u[6])
if tpm > 0 then tl = drained(tl, num(u[5]), tpm) end
if rpm > 0 then rl = drained(rl, num(u[7]), rpm) end
for i = 4, #ARGV, 6 do
  if redis.call('ZADD', KEYS[3], 'NX', now, ARGV[i]) == 1 then
    local resv, release = ARGV[i + 1], ARGV[i + 4]
    if resv ~= '' and release == '' then
      redis.call('HDEL', KEYS[2], resv)
    elseif resv ~= '' then
      local held = redis.call('HGET', KEYS[2], resv)
      if held then
        local c, e = string.match(held, '^([^:]+):([^:]+)$')
        redis.call('HSET', KEYS[2], resv, fmt(math.max(0, tonumber(c) - tonumber(release))) .. ':' .. e)
      end
    end
    spend = spend + tonumber(ARGV[i + 2])
    pspend = pspend + tonumber(ARGV[i + 2])
    tl = math.max(0, tl + tonumber(ARGV[i + 3]))
    rl = math.max(0, rl + tonumber(ARGV[i + 5]))
  end
end
redis.call('HSET', KEYS[1], 'spend', fmt(spend), 'period_spend', fmt(pspend), 'period_start', fmt(pstart),
           'tpm_level', fmt(tl), 'tpm_at', fmt(now), 'rpm_level', fmt(rl), 'rpm_at', fmt(now))
return 1
"""

# KEYS: definition, hash index, active set, all set. ARGV: id, hash, name, spec, source, created.
PUT = """
local old = redis.call('HGET', KEYS[1], 'key_hash')
if old and old ~= ARGV[2] then redis.call('DEL', ARGV[7] .. old) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'key_hash', ARGV[2], 'name', ARGV[3], 'spec', ARGV[4], 'source', ARGV[5],
           'created', ARGV[6])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

# KEYS: definition, active set. ARGV: id, time. Returns 1 when an active key was revoked.
REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""


class RedisKeyStore:
    """Keys under ``bpo:keys:*``; every replica pointed at the same Redis shares keys, spend and limits."""

    def __init__(self, url: str, *, op_timeout: float = 2.0, namespace: str = NAMESPACE) -> None:
        self.url = redact_url(url)  # for messages only: it is logged
        self.ns = namespace
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=op_timeout, socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), client_name="bpo-keys")
        self._admit = self._client.register_script(ADMIT)
        self._settle = self._client.register_script(SETTLE)
        self._put = self._client.register_script(PUT)
        self._revoke = self._client.register_script(REVOKE)

    def _key(self, key_id: str, part: str) -> str:
        return f"{self.ns}:{{{key_id}}}:{part}"

    @property
    def _active(self) -> str:
        return f"{self.ns}:active"

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except REDIS_FAULTS as exc:
            raise KeyStoreError(f"key store {self.url}: {type(exc).__name__}: {exc}") from exc

    async def start(self) -> None:
        return None  # connects on first use: a Redis that is down at start fails requests closed, not start-up

    async def close(self) -> None:
        await self._client.aclose()

    async def put(self, key: ClientKey) -> None:
        spec = orjson.dumps(key.limits_json()).decode()
        hash_prefix = f"{self.ns}:hash:"
        await self._call(self._put(
            keys=[self._key(key.id, "def"), hash_prefix + key.key_hash, self._active, f"{self.ns}:all"],
            args=[key.id, key.key_hash, key.name, spec, key.source, repr(key.created), hash_prefix]))

    async def find(self, key_hash: str) -> ClientKey | None:
        found: Any = await self._call(self._client.get(f"{self.ns}:hash:{key_hash}"))
        if found is None:
            return None
        key_id = _text(found)
        fields: dict[Any, Any] = await self._call(self._client.hgetall(self._key(key_id, "def")))
        if not fields or b"revoked" in fields or _text(fields.get(b"key_hash", b"")) != key_hash:
            return None
        return _key_of(key_id, fields)

    async def list_keys(self) -> list[KeyRecord]:
        members: Any = await self._call(self._client.smembers(f"{self.ns}:all"))
        ids = sorted(_text(i) for i in members)
        async with self._client.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._key(key_id, "def"))
                pipe.hmget(self._key(key_id, "usage"), "spend", "period_spend", "period_start")
            replies: list[Any] = await self._call(pipe.execute())
        records = []
        for index, key_id in enumerate(ids):
            fields, usage = replies[2 * index], replies[2 * index + 1]
            if not fields:
                continue
            key = _key_of(key_id, fields)
            started = float(usage[2] or 0)
            current = not key.period_seconds or time.time() < started + key.period_seconds
            revoked = fields.get(b"revoked")
            records.append(KeyRecord(key, float(usage[0] or 0), float(usage[1] or 0) if current else 0.0,
                                     float(revoked) if revoked else None))
        return sorted(records, key=lambda r: r.key.created)

    async def revoke(self, key_id: str) -> bool:
        done = await self._call(self._revoke(keys=[self._key(key_id, "def"), self._active],
                                             args=[key_id, repr(time.time())]))
        return bool(done)

    async def revoke_config_keys_except(self, keep: Sequence[str]) -> None:
        for record in await self.list_keys():
            if record.key.source == "config" and record.revoked is None and record.key.id not in keep:
                await self.revoke(record.key.id)

    async def count(self) -> int:
        return int(await self._call(self._client.scard(self._active)))

    async def admit(self, key: ClientKey, ask: Ask, most: int = 1) -> Admission:
        budget = -1.0 if key.max_budget_usd is None else key.max_budget_usd
        reservation = reservation_id()
        reply = await self._call(self._admit(
            keys=[self._key(key.id, "def"), self._key(key.id, "usage"), self._key(key.id, "resv")],
            args=[key.rpm or 0, key.tpm or 0, repr(budget), key.period_seconds, ask.tokens, repr(ask.cost),
                  repr(ask.hold_seconds), reservation, most, repr(LEASE_SHARE)]))
        admitted, code, wait = int(reply[0]), _text(reply[1]), int(reply[2])
        if admitted:
            held = key.max_budget_usd is not None and ask.cost > 0
            return Admission(True, reservation=reservation if held else None, granted=int(reply[3]))
        return Admission(False, code, wait or None)

    async def settle(self, key: ClientKey, settlements: Sequence[Settlement]) -> None:
        args: list[Any] = [key.rpm or 0, key.tpm or 0, key.period_seconds]
        for item in settlements:
            release = "" if item.release is None else repr(item.release)
            args += [item.id or settlement_id(), item.reservation or "", repr(item.cost),
                     repr(float(item.tokens_delta)), release, repr(float(item.requests_delta))]
        keys = [self._key(key.id, "usage"), self._key(key.id, "resv"), self._key(key.id, "settled")]
        await self._call(self._settle(keys=keys, args=args))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key_of(key_id: str, fields: dict[Any, Any]) -> ClientKey:
    spec = {**orjson.loads(fields[b"spec"]), "name": _text(fields[b"name"])}
    key = key_from_spec(spec, key_hash=_text(fields[b"key_hash"]), id=key_id,
                        source="config" if fields.get(b"source") == b"config" else "api", where=f"key store: {key_id}")
    return dataclasses.replace(key, created=float(fields.get(b"created", b"0")))
