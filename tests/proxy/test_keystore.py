"""Both key stores against the real thing (a SQLite file, the Redis at 127.0.0.1:6379): keys, admission, spend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from proxy.keys import ClientKey, hash_key, new_id
from proxy.keystore import (
    KeyStore,
    KeyStoreError,
    Settlement,
    SqliteKeyStore,
    build_key_store,
    count_keys_now,
    merge_settlements,
)
from proxy.limits import Ask
from tests.fakes.fixtures import SHARED_REDIS_URL

OpenStore = Callable[[], KeyStore]
ASK = Ask(tokens=0, cost=0.0, hold_seconds=60.0)


def make_key(**limits: object) -> ClientKey:
    return ClientKey(id=new_id(), name="team-" + uuid.uuid4().hex[:6], key_hash=hash_key(uuid.uuid4().hex),
                     **limits)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores on one backing store: each call is another process's view of the same keys."""
    namespace = f"bpo-test-{uuid.uuid4().hex[:12]}"
    spec = f"sqlite:{tmp_path / 'keys.db'}" if request.param == "sqlite" else SHARED_REDIS_URL
    opened: list[KeyStore] = []

    def open_one() -> KeyStore:
        store = build_key_store(spec, namespace)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()
    if request.param == "redis":
        client = redis.Redis.from_url(SHARED_REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
        client.close()


async def started(store: KeyStore) -> KeyStore:
    await store.start()
    return store


async def test_keys_are_found_by_hash_listed_and_revoked(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(models=("gpt-4o-mini",), rpm=5, max_budget_usd=2.5, optimize="off")
    await store.put(key)
    found = await store.find(key.key_hash)
    assert found is not None and found.id == key.id and found.models == ("gpt-4o-mini",)
    assert (found.rpm, found.max_budget_usd, found.optimize) == (5, 2.5, "off")
    assert await store.find(hash_key("not a key")) is None
    assert await store.count() == 1
    assert await store.revoke(key.id) is True
    assert await store.revoke(key.id) is False
    assert await store.find(key.key_hash) is None and await store.count() == 0
    [record] = await store.list_keys()
    assert record.key.id == key.id and record.revoked is not None and record.spend_usd == 0.0


async def test_rpm_refuses_past_the_limit_with_a_retry_after(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=3)
    await store.put(key)
    results = [await store.admit(key, ASK) for _ in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    assert results[3].code == "rate_limit_exceeded" and results[3].retry_after is not None
    assert 1 <= results[3].retry_after <= 20  # one request drains in 60/3 s


async def test_tpm_counts_the_worst_case_then_the_actual_tokens(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(tpm=1000)
    await store.put(key)
    assert (await store.admit(key, Ask(900, 0.0, 60))).ok
    assert not (await store.admit(key, Ask(200, 0.0, 60))).ok
    await store.settle(key, [Settlement(None, 0.0, -800)])  # it used 100 tokens, not 900
    assert (await store.admit(key, Ask(200, 0.0, 60))).ok


async def test_budget_reserves_the_worst_case_and_settles_to_the_actual_cost(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(max_budget_usd=1.0)
    await store.put(key)
    ask = Ask(0, 0.3, 60)
    admitted = [await store.admit(key, ask) for _ in range(4)]
    assert [a.ok for a in admitted] == [True, True, True, False]
    assert admitted[3].code == "budget_exceeded"
    await store.settle(key, [Settlement(a.reservation, 0.1, 0) for a in admitted[:3]])
    [record] = await store.list_keys()
    assert record.spend_usd == pytest.approx(0.3)
    assert [(await store.admit(key, ask)).ok for _ in range(3)] == [True, True, False]  # 0.3 + 2 x 0.3 fit


async def test_a_spent_budget_refuses_even_free_requests(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(max_budget_usd=0.5)
    await store.put(key)
    await store.settle(key, [Settlement(None, 0.5, 0)])
    refused = await store.admit(key, ASK)
    assert not refused.ok and refused.code == "budget_exceeded"


async def test_an_abandoned_reservation_expires(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(max_budget_usd=1.0)
    await store.put(key)
    assert (await store.admit(key, Ask(0, 0.9, hold_seconds=0.3))).ok  # its replica died: never settled
    assert not (await store.admit(key, Ask(0, 0.9, 60))).ok
    await asyncio.sleep(0.6)
    assert (await store.admit(key, Ask(0, 0.9, 60))).ok


async def test_revoked_keys_are_refused_by_admission_itself(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=100)
    await store.put(key)
    await store.revoke(key.id)
    refused = await store.admit(key, ASK)
    assert not refused.ok and refused.code == "invalid_api_key"


async def test_concurrent_admissions_from_two_stores_never_overspend(open_store: OpenStore) -> None:
    """30 requests at once over two connections (two replicas) against a budget that covers 10."""
    first, second = await started(open_store()), await started(open_store())
    key = make_key(max_budget_usd=1.0)
    await first.put(key)
    ask = Ask(0, 0.1, 60)
    results = await asyncio.gather(*(store.admit(key, ask) for store in [first, second] * 15))
    assert sum(r.ok for r in results) == 10
    assert {r.code for r in results if not r.ok} == {"budget_exceeded"}


async def test_concurrent_rpm_from_two_stores(open_store: OpenStore) -> None:
    first, second = await started(open_store()), await started(open_store())
    key = make_key(rpm=10)
    await first.put(key)
    results = await asyncio.gather(*(store.admit(key, ASK) for store in [first, second] * 15))
    assert sum(r.ok for r in results) == 10


async def test_keys_and_spend_survive_reopening(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(max_budget_usd=10.0)
    await store.put(key)
    admitted = await store.admit(key, Ask(0, 1.0, 60))
    await store.settle(key, [Settlement(admitted.reservation, 0.75, 0)])
    await store.close()
    reopened = await started(open_store())
    assert (await reopened.find(key.key_hash)) is not None
    [record] = await reopened.list_keys()
    assert record.spend_usd == pytest.approx(0.75)


async def test_putting_a_key_again_keeps_its_spend_and_takes_the_new_limits(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=1)
    await store.put(key)
    await store.settle(key, [Settlement(None, 0.2, 0)])
    changed = ClientKey(id=key.id, name=key.name, key_hash=key.key_hash, rpm=50, source="config")
    await store.put(changed)
    [record] = await store.list_keys()
    assert record.key.rpm == 50 and record.spend_usd == pytest.approx(0.2)
    await store.revoke_config_keys_except([])
    assert await store.find(key.key_hash) is None


async def test_sqlite_creates_no_file_until_a_key_is_written(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = SqliteKeyStore(str(path))
    await store.start()
    assert await store.count() == 0 and await store.find(hash_key("x")) is None and not path.exists()
    assert count_keys_now(f"sqlite:{path}") == 0
    await store.put(make_key())
    assert path.exists() and count_keys_now(f"sqlite:{path}") == 1
    await store.close()


async def test_sqlite_budget_periods_roll_over(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SqliteKeyStore(str(tmp_path / "keys.db"), clock=lambda: now[0])
    key = make_key(max_budget_usd=1.0, budget_period="1h")
    await store.put(key)
    assert (await store.admit(key, Ask(0, 0.6, 60))).ok
    await store.settle(key, [Settlement(None, 1.0, 0)])
    refused = await store.admit(key, ASK)
    assert refused.code == "budget_exceeded" and refused.retry_after is not None and refused.retry_after <= 3600
    now[0] += 3601
    assert (await store.admit(key, Ask(0, 0.6, 60))).ok
    [record] = await store.list_keys()
    assert record.spend_usd == pytest.approx(1.0) and record.period_spend_usd == 0.0
    await store.close()


async def test_an_unreadable_store_raises_the_store_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    store = SqliteKeyStore(str(path))
    with pytest.raises(KeyStoreError):
        await store.start()
    await store.close()


async def test_a_redis_store_that_is_down_raises_the_store_error() -> None:
    store = build_key_store("redis://127.0.0.1:1/0")
    with pytest.raises(KeyStoreError):
        await store.find(hash_key("x"))
    await store.close()


async def test_a_store_error_never_shows_the_redis_password() -> None:
    store = build_key_store("redis://:s3cret@127.0.0.1:1/0")
    with pytest.raises(KeyStoreError) as caught:
        await store.find(hash_key("x"))
    await store.close()
    assert "127.0.0.1" in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(KeyStoreError) as caught:
        count_keys_now("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in str(caught.value)


async def test_a_settlement_written_twice_counts_once_on_redis(open_store: OpenStore) -> None:
    """A retry after a timeout whose first write landed must not double the spend (SQLite rolls back instead)."""
    store = await started(open_store())
    key = make_key(max_budget_usd=5.0)
    await store.put(key)
    queued = merge_settlements([Settlement(None, 0.4, 0)])  # queued for a write: it has its id now
    await store.settle(key, queued)
    if not isinstance(store, SqliteKeyStore):
        await store.settle(key, queued)
    [record] = await store.list_keys()
    assert record.spend_usd == pytest.approx(0.4)


async def test_a_lease_is_a_tenth_of_what_is_free_and_is_charged_in_full(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=600, max_budget_usd=100.0)
    await store.put(key)
    lease = await store.admit(key, Ask(0, 0.5, 60), most=100)
    assert lease.ok and lease.granted == 20  # the budget's 100 / 0.5 = 200 requests free, a tenth of them
    second = await store.admit(key, Ask(0, 0.5, 60), most=100)
    assert second.ok and second.granted == 18  # rpm: 600 - 20 = 580 free, 58; budget: 90 / 0.5 = 180, 18
    near_the_end = make_key(rpm=5)
    await store.put(near_the_end)
    assert [(await store.admit(near_the_end, ASK, most=100)).granted for _ in range(5)] == [1] * 5
    assert not (await store.admit(near_the_end, ASK, most=100)).ok


async def test_a_lease_settles_in_parts_then_gives_back_what_it_did_not_use(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=1000, max_budget_usd=10.0)
    await store.put(key)
    lease = await store.admit(key, Ask(0, 0.1, 60), most=10)  # 10 requests' worth: $1.0 reserved, rpm 10
    assert lease.granted == 10
    # Two requests settled at $0.05 each (the reservation shrinks by what they cost), then the lease retires
    # with 8 requests and $0.8 unused, then its last request settles and closes the reservation.
    await store.settle(key, [Settlement(lease.reservation, 0.05, 0, 0.05) for _ in range(2)])
    await store.settle(key, [Settlement(lease.reservation, 0.0, 0, 0.8, -8)])
    assert (await store.admit(key, Ask(0, 9.8, 60))).ok  # 10 - 0.1 spent - 0.1 still held by the last request
    assert not (await store.admit(key, Ask(0, 0.01, 60))).ok
    [record] = [r for r in await store.list_keys() if r.key.id == key.id]
    assert record.spend_usd == pytest.approx(0.1)


async def test_given_back_requests_free_the_rate_limit(open_store: OpenStore) -> None:
    store = await started(open_store())
    key = make_key(rpm=20)
    await store.put(key)
    lease = await store.admit(key, ASK, most=100)
    assert lease.granted == 2
    for _ in range(18):
        assert (await store.admit(key, ASK)).ok
    assert not (await store.admit(key, ASK)).ok
    await store.settle(key, [Settlement(None, 0.0, 0, None, -2)])  # the lease used none of its two
    assert (await store.admit(key, ASK)).ok
