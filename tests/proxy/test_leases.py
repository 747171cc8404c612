"""Leases of a key's limits (proxy/leases.py) over a real SQLite store: local admission that never overspends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy import leases as leases_module
from proxy.keys import ClientKey, hash_key, new_id
from proxy.keystore import Settlement, SqliteKeyStore, merge_settlements
from proxy.leases import Lease, Leases
from proxy.limits import Admission, Ask


def make_key(**limits: object) -> ClientKey:
    return ClientKey(id=new_id(), name="team-" + uuid.uuid4().hex[:6], key_hash=hash_key(uuid.uuid4().hex),
                     **limits)  # type: ignore[arg-type]


class Replica:
    """One process's leases over the shared store, their accounts written when ``flush`` is called."""

    def __init__(self, store: SqliteKeyStore, clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.store_calls = 0
        self.wakes = 0
        self.gate: asyncio.Event | None = None  # when set by a test: the store answers once it opens
        self.leases = Leases(self.grant, self.wake, clock or asyncio.get_running_loop().time)

    async def grant(self, key: ClientKey, ask: Ask, most: int) -> Admission:
        self.store_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self.store.admit(key, ask, most)

    def wake(self) -> None:
        self.wakes += 1

    async def take(self, key: ClientKey, ask: Ask) -> Lease | Admission:
        return await self.leases.take(key, ask)

    async def flush(self) -> None:
        for key, item in self.leases.accounts():
            await self.store.settle(key, [item])


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteKeyStore]:
    opened = SqliteKeyStore(str(tmp_path / "keys.db"))
    await opened.start()
    yield opened
    await opened.close()


async def spend_of(store: SqliteKeyStore, key: ClientKey) -> float:
    [record] = [r for r in await store.list_keys() if r.key.id == key.id]
    return record.spend_usd


async def test_many_requests_at_once_take_one_lease(store: SqliteKeyStore) -> None:
    key = make_key(rpm=10_000)
    await store.put(key)
    replica = Replica(store)
    taken = await asyncio.gather(*(replica.take(key, Ask(0, 0.0, 60)) for _ in range(50)))
    assert all(isinstance(lease, Lease) for lease in taken)
    assert replica.store_calls == 1  # one lease of 1,000 requests (a tenth of 10,000 free)
    assert len({id(lease) for lease in taken}) == 1


async def test_a_spent_lease_is_replaced_and_the_next_one_is_smaller_near_the_limit(store: SqliteKeyStore) -> None:
    key = make_key(rpm=100)
    await store.put(key)
    replica = Replica(store)
    granted: list[Lease] = []
    for _ in range(100):
        lease = await replica.take(key, Ask(0, 0.0, 60))
        assert isinstance(lease, Lease)
        if not granted or lease is not granted[-1]:
            granted.append(lease)
    refused = await replica.take(key, Ask(0, 0.0, 60))
    assert isinstance(refused, Admission) and refused.code == "rate_limit_exceeded"
    # 10 of 100 free, then 9 of 90, ... down to one request a lease: all 100 requests, never the 101st.
    assert 10 < replica.store_calls < 100


async def test_thirty_requests_on_two_replicas_never_overspend_a_budget_for_ten(store: SqliteKeyStore) -> None:
    key = make_key(max_budget_usd=1.0)
    await store.put(key)
    first, second = Replica(store), Replica(store)
    ask = Ask(0, 0.1, 60)
    taken = await asyncio.gather(*(replica.take(key, ask) for replica in [first, second] * 15))
    admitted = [(replica, lease) for replica, lease in zip([first, second] * 15, taken, strict=True)
                if isinstance(lease, Lease)]
    assert len(admitted) == 10
    assert {lease.code for lease in taken if isinstance(lease, Admission)} == {"budget_exceeded"}
    for replica, lease in admitted:  # each cost exactly its worst case
        replica.leases.settle(key, lease, 0.1, 0.1, 0)
    await first.flush()
    await second.flush()
    assert await spend_of(store, key) == pytest.approx(1.0)
    assert isinstance(await first.take(key, Ask(0, 0.01, 60)), Admission)


async def test_a_cheaper_answer_returns_the_rest_of_its_worst_case_to_the_lease(store: SqliteKeyStore) -> None:
    key = make_key(max_budget_usd=100.0)
    await store.put(key)
    replica = Replica(store)
    lease = await replica.take(key, Ask(0, 1.0, 60))
    assert isinstance(lease, Lease) and lease.usd == pytest.approx(9.0)  # 10 requests' worth, one taken
    replica.leases.settle(key, lease, 1.0, 0.25, 0)
    assert lease.usd == pytest.approx(9.75)
    await replica.flush()
    assert await spend_of(store, key) == pytest.approx(0.25)


async def test_the_requests_of_a_lease_are_written_as_one_settlement(store: SqliteKeyStore) -> None:
    key = make_key(tpm=100_000, max_budget_usd=100.0)
    await store.put(key)
    replica = Replica(store)
    taken = [await replica.take(key, Ask(100, 1.0, 60)) for _ in range(5)]
    lease = taken[0]
    assert isinstance(lease, Lease) and all(other is lease for other in taken)
    for _ in taken:  # each cost a quarter of its worst case, 40 tokens fewer
        replica.leases.settle(key, lease, 1.0, 0.25, -40)
    assert replica.wakes == 1  # the settler is woken once for the lease, not per request
    [(_, settlement)] = replica.leases.accounts()
    assert settlement.reservation == lease.reservation and settlement.cost == pytest.approx(1.25)
    assert settlement.release == pytest.approx(1.25) and settlement.tokens_delta == -200
    await store.settle(key, [settlement])
    assert await spend_of(store, key) == pytest.approx(1.25)
    assert replica.leases.accounts() == []


async def test_an_idle_lease_gives_back_what_it_did_not_use(store: SqliteKeyStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases_module, "LEASE_SECONDS", 0.2)
    key = make_key(rpm=200, max_budget_usd=10.0)
    await store.put(key)
    first, second = Replica(store), Replica(store)
    lease = await first.take(key, Ask(0, 0.5, 60))  # 2 requests' worth: $1 held, one taken
    assert isinstance(lease, Lease) and lease.usd == pytest.approx(0.5)
    await asyncio.sleep(0.5)
    assert lease.retired and first.wakes == 1
    [(_, given_back)] = first.leases.accounts()
    assert given_back.release == pytest.approx(0.5) and given_back.requests_delta == -1
    await first.store.settle(key, [given_back])
    # The other replica can now reserve all but the one request still in flight on the first.
    assert isinstance(await second.take(key, Ask(0, 9.5, 60)), Lease)
    first.leases.settle(key, lease, 0.5, 0.5, 0)  # the last request of a retired lease closes its reservation
    [(_, closing)] = first.leases.accounts()
    assert closing.release is None and closing.cost == 0.5
    assert first.leases.accounts() == []  # written once; the lease has nothing more to tell


class Clock:
    """The leases' clock, moved by the test. (Their expiry timers run on the loop's: ``LEASE_SECONDS`` is set
    long enough that none fires during a test.)"""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def slow_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases_module, "LEASE_SECONDS", 60.0)


FREE = Ask(0, 0.0, 60)  # a request that costs nothing: only rpm counts it


async def one_lease(store: SqliteKeyStore, ask: Ask, **limits: object) -> tuple[ClientKey, Clock, Replica, Lease]:
    """A new key with ``limits``, and a replica on a clock the test moves that holds its first lease."""
    key = make_key(**limits)
    await store.put(key)
    clock = Clock()
    replica = Replica(store, clock)
    lease = await replica.take(key, ask)
    assert isinstance(lease, Lease) and replica.store_calls == 1
    return key, clock, replica, lease


@pytest.mark.usefixtures("slow_timers")
async def test_a_lease_in_use_is_renewed_before_it_runs_out(store: SqliteKeyStore) -> None:
    key, clock, replica, first = await one_lease(store, FREE, rpm=10_000)
    clock.now += 60 * 0.7
    assert replica.leases.take_now(key, FREE) is first and replica.store_calls == 1
    clock.now += 60 * 0.1  # past three quarters of its life
    assert replica.leases.take_now(key, FREE) is first  # admitted at once; the renewal starts
    await until(lambda: first.retired)
    assert replica.store_calls == 2
    second = replica.leases.take_now(key, FREE)
    assert isinstance(second, Lease) and second is not first  # the next request never waited for the store
    [(_, given_back)] = replica.leases.accounts()
    assert given_back.requests_delta < 0  # the first lease's unused requests went back


@pytest.mark.usefixtures("slow_timers")
async def test_a_refused_renewal_leaves_the_lease_serving_and_is_not_asked_again(store: SqliteKeyStore) -> None:
    ask = Ask(0, 0.05, 60)
    key, clock, replica, lease = await one_lease(store, ask, max_budget_usd=1.0)  # 2 requests' worth: $1 / 10
    assert (await store.admit(key, Ask(0, 0.9, 60))).ok  # another replica takes the rest of the budget
    clock.now += 60 * 0.8
    assert replica.leases.take_now(key, ask) is lease
    await until(lambda: replica.store_calls == 2)
    await asyncio.sleep(0.05)
    assert not lease.retired  # refused (budget): the lease still serves what it holds
    assert replica.leases.take_now(key, ask) is None  # run out now: take would ask the store
    assert replica.store_calls == 2


@pytest.mark.usefixtures("slow_timers")
async def test_a_renewal_refused_for_a_revoked_key_retires_the_lease(store: SqliteKeyStore) -> None:
    key, clock, replica, lease = await one_lease(store, FREE, rpm=10_000)
    await store.revoke(key.id)  # through another replica
    clock.now += 60 * 0.8
    assert replica.leases.take_now(key, FREE) is lease
    await until(lambda: lease.retired)
    refused = await replica.take(key, FREE)
    assert isinstance(refused, Admission) and refused.code == "invalid_api_key"


@pytest.mark.usefixtures("slow_timers")
async def test_a_renewal_granted_after_its_lease_was_retired_gives_it_all_back(store: SqliteKeyStore) -> None:
    key, clock, replica, lease = await one_lease(store, FREE, rpm=1000)
    replica.gate = asyncio.Event()
    clock.now += 60 * 0.8
    assert replica.leases.take_now(key, FREE) is lease
    await until(lambda: replica.store_calls == 2)
    replica.leases.retire_all()  # a revocation here, while the store is asked
    replica.gate.set()
    await replica.leases.close()  # waits for the renewal
    assert replica.leases.take_now(key, FREE) is None
    given_back = {round(item.requests_delta) for _, item in replica.leases.accounts()}
    # The first lease's unused 98 of 100, and the renewal's whole grant: a tenth of the 900 then free.
    assert given_back == {-98, -90}


async def test_revocation_retires_this_replicas_leases(store: SqliteKeyStore) -> None:
    key = make_key(rpm=1000)
    await store.put(key)
    replica = Replica(store)
    assert isinstance(await replica.take(key, Ask(0, 0.0, 60)), Lease)
    await store.revoke(key.id)
    replica.leases.retire_all()
    refused = await replica.take(key, Ask(0, 0.0, 60))
    assert isinstance(refused, Admission) and refused.code == "invalid_api_key"


def test_settlements_of_one_lease_merge_into_one_write() -> None:
    parts = [Settlement("r1", 0.1, -5, 0.1), Settlement("r1", 0.2, 3, 0.2), Settlement(None, 0.5, 0),
             Settlement("r2", 0.0, 0, 0.3, -2)]
    merged = {item.reservation: item for item in merge_settlements(parts)}
    assert merged["r1"].cost == pytest.approx(0.3) and merged["r1"].release == pytest.approx(0.3)
    assert merged["r1"].tokens_delta == -2 and merged[None].cost == 0.5 and merged["r2"].requests_delta == -2
    closing = merge_settlements([Settlement("r1", 0.1, 0, 0.1), Settlement("r1", 0.1, 0, None)])
    assert len(closing) == 1 and closing[0].release is None and closing[0].cost == pytest.approx(0.2)


def test_a_settlement_whose_write_failed_keeps_its_id_when_merged_again() -> None:
    """The retry of a write that may have landed must be recognised by Redis: same settlement, same id."""
    [failed] = merge_settlements([Settlement("r1", 0.1, 0, 0.1), Settlement("r1", 0.2, 0, 0.2)])
    again = merge_settlements([failed, Settlement("r1", 0.3, 0, 0.3)])
    assert again[0] is failed and again[0].cost == pytest.approx(0.3)
    assert len(again) == 2 and again[1].id not in ("", failed.id) and again[1].cost == pytest.approx(0.3)
