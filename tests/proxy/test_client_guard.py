"""The client-key check (proxy/clients.py) over a real SQLite store, on a clock the test moves: which requests
pass without the store, and how long a key stays valid here once it is revoked elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.budget import Pricing
from proxy.clients import CLIENT, ClientGuard, take_client_key
from proxy.keystore import SqliteKeyStore
from proxy.metrics import Metrics
from tests.fakes.proxy_server import make_settings

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(key: str | None, path: str = CHAT, method: str = "POST", **headers: str) -> dict[str, Any]:
    pairs = [(b"host", b"gateway"), *((name.replace("_", "-").encode(), value.encode())
                                      for name, value in headers.items())]
    if key is not None:
        pairs.append((b"authorization", f"Bearer {key}".encode()))
    return {"type": "http", "path": path, "method": method, "headers": pairs}


async def passes(guard: ClientGuard, scope: dict[str, Any]) -> tuple[bool, bool]:
    """(passed without the store's help, passed at all) for one request."""
    presented = take_client_key(scope)
    if guard.admit_known(scope, presented):
        return True, True
    return False, await guard.check(scope, presented) is None


@pytest.fixture
async def guard(tmp_path: Path) -> AsyncIterator[tuple[ClientGuard, Clock]]:
    settings = make_settings(client_auth="on", key_store=f"sqlite:{tmp_path / 'keys.db'}", key_cache_seconds=10)
    store = SqliteKeyStore(str(tmp_path / "keys.db"))
    clock = Clock()
    checker = ClientGuard(settings, store, Metrics(), Pricing(settings), clock=clock)
    await store.start()
    await checker.start()
    yield checker, clock
    await checker.close()
    await store.close()


def test_every_client_key_header_is_taken_out() -> None:
    scope = request("sk-one", x_api_key="sk-two", api_key="sk-three", accept="*/*")
    assert take_client_key(scope) == "sk-one"
    assert scope["headers"] == [(b"host", b"gateway"), (b"accept", b"*/*")]
    messages = request(None, "/v1/messages", x_api_key="sk-anthropic")
    assert take_client_key(messages) == "sk-anthropic" and messages["headers"] == [(b"host", b"gateway")]
    assert take_client_key(request(None, x_api_key="sk-two")) is None  # x-api-key counts on /v1/messages only


async def test_a_key_found_valid_is_known_without_the_store_until_its_cache_time_ends(
        guard: tuple[ClientGuard, Clock]) -> None:
    checker, clock = guard
    created, secret = await checker.create({"name": "team"})
    assert await passes(checker, request(secret)) == (False, True)  # looked up in the store once
    scope = request(secret)
    assert await passes(checker, scope) == (True, True)
    assert scope[CLIENT].key.id == created.id and not scope[CLIENT].admitted  # a metered route admits it later
    await checker.store.revoke(created.id)  # through another replica: this one does not know yet
    clock.now += 9
    assert await passes(checker, request(secret)) == (True, True)
    clock.now += 1  # --key-cache-seconds after it was found valid
    assert await passes(checker, request(secret)) == (False, False)
    assert await passes(checker, request(secret)) == (False, False)


async def test_a_revocation_here_takes_effect_at_once(guard: tuple[ClientGuard, Clock]) -> None:
    checker, _ = guard
    created, secret = await checker.create({"name": "team"})
    await passes(checker, request(secret))
    assert await checker.revoke(created.id)
    assert await passes(checker, request(secret)) == (False, False)


async def test_an_unknown_key_and_no_key_never_pass(guard: tuple[ClientGuard, Clock]) -> None:
    checker, _ = guard
    await checker.create({"name": "team"})
    for _ in range(2):  # the refusal is remembered (by hash), never as a known key
        assert await passes(checker, request("sk-bpo-not-a-key-at-all")) == (False, False)
    assert await passes(checker, request(None)) == (False, False)


async def test_a_limited_key_on_an_unmetered_route_is_admitted_by_the_store_path(
        guard: tuple[ClientGuard, Clock]) -> None:
    checker, _ = guard
    _, secret = await checker.create({"name": "team", "rpm": 100})
    await passes(checker, request(secret))
    scope = request(secret, "/v1/models", "GET")
    assert await passes(checker, scope) == (False, True)  # counted against rpm: a lease, never skipped
    assert scope[CLIENT].admitted
    unlimited_secret = (await checker.create({"name": "open"}))[1]
    await passes(checker, request(unlimited_secret))
    models = request(unlimited_secret, "/v1/models", "GET")
    assert await passes(checker, models) == (True, True) and models[CLIENT].admitted
