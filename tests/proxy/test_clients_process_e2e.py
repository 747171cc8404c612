"""Client keys across ``bpo serve`` processes: restarts keep keys and spend, replicas share limits and budgets,
and an open relay is refused at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.keys import ClientKey, hash_key, new_id
from proxy.keystore import SqliteKeyStore
from proxy.leases import LEASE_SECONDS
from proxy.open_relay import open_relay_problem
from tests.fakes.fixtures import SHARED_REDIS_URL
from tests.fakes.proxy_server import REPO, ProxyProcess, make_settings
from tests.fakes.upstream import FakeUpstream
from tests.proxy.keys_helpers import (
    ADMIN,
    ADMIN_KEY,
    PRICED_MODEL,
    create_key,
    priced_config,
    request_cost,
    settled_spend,
    spend_of,
    worst_case_billing,
)

MESSAGES = [{"role": "user", "content": "Tell me about black holes."}]
StartServe = Callable[..., ProxyProcess]


@pytest.fixture
def serve(upstream: FakeUpstream, tmp_path: Path) -> Iterator[StartServe]:
    started: list[ProxyProcess] = []
    config = priced_config(tmp_path / "bpo.yaml", upstream.base_url)

    def start(*extra: str) -> ProxyProcess:
        process = ProxyProcess(["--upstream-base-url", upstream.base_url, "--optimizer", "none",
                                "--admin-key", ADMIN_KEY, "--config", config, "--no-access-log", *extra]).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def store_flags(kind: str, tmp_path: Path, namespace: str) -> list[str]:
    """Client auth on: with auto, a replica started before the first key exists turns on only within
    --key-cache-seconds of its creation on another replica."""
    if kind == "sqlite":
        return ["--key-store", f"sqlite:{tmp_path / 'keys.db'}", "--client-auth", "on"]
    return ["--key-store", SHARED_REDIS_URL, "--cache-namespace", namespace, "--client-auth", "on"]


def chat(process: ProxyProcess, key: str, **body: object) -> None:
    client = openai.OpenAI(base_url=process.base_url, api_key=key, max_retries=0, timeout=60)
    client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, **body)  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_restart_keeps_keys_and_spend(serve: StartServe, tmp_path: Path, namespace: str, kind: str) -> None:
    first = serve(*store_flags(kind, tmp_path, namespace))
    created = create_key(first.url, name="survivor")
    chat(first, created["key"])
    spent = settled_spend(first.url, created["id"], at_least=1e-6)
    first.stop()
    second = serve(*store_flags(kind, tmp_path, namespace))
    chat(second, created["key"])  # the key still works: client auth is on from the store's key
    with pytest.raises(openai.AuthenticationError):
        chat(second, "sk-provider")
    assert settled_spend(second.url, created["id"], at_least=2 * spent) == pytest.approx(2 * spent)


def replicas(serve: StartServe, tmp_path: Path, namespace: str) -> tuple[ProxyProcess, ProxyProcess]:
    flags = store_flags("redis", tmp_path, namespace)
    return serve(*flags), serve(*flags)


def test_two_replicas_share_keys_and_revocation(serve: StartServe, tmp_path: Path, namespace: str) -> None:
    one, two = replicas(serve, tmp_path, namespace)
    created = create_key(one.url, rpm=1000)
    chat(two, created["key"])  # created on one, accepted by the other
    httpx.delete(f"{one.url}/admin/keys/{created['id']}", headers=ADMIN, timeout=30)
    time.sleep(LEASE_SECONDS)  # a limited key's lease on the other replica has run out: its next one is refused
    with pytest.raises(openai.AuthenticationError):
        chat(two, created["key"])


async def burst(processes: list[ProxyProcess], key: str, count: int, **body: object) -> list[int]:
    clients = [openai.AsyncOpenAI(base_url=p.base_url, api_key=key, max_retries=0, timeout=60) for p in processes]

    async def one(client: openai.AsyncOpenAI) -> int:
        try:
            await client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, **body)  # type: ignore[call-overload]
            return 200
        except openai.RateLimitError as exc:
            return 429 if exc.response.json()["error"]["code"] else 0

    statuses = await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(count)))
    for client in clients:
        await client.close()
    return list(statuses)


@pytest.mark.parametrize("kind", ["one process", "two replicas"])
async def test_30_concurrent_requests_never_overspend_a_budget_for_10(
        serve: StartServe, upstream: FakeUpstream, tmp_path: Path, namespace: str, kind: str) -> None:
    upstream.responders["/v1/chat/completions"] = worst_case_billing(delay=0.3)
    processes = [serve(*store_flags("redis", tmp_path, namespace))]
    if kind == "two replicas":
        processes.append(serve(*store_flags("redis", tmp_path, namespace)))
    budget = 10 * request_cost() + 0.01
    created = create_key(processes[0].url, max_budget_usd=budget)
    statuses = await burst(processes, created["key"], 30, max_tokens=1000)
    admitted = statuses.count(200)
    assert 1 <= admitted <= 11 and statuses.count(429) == 30 - admitted
    spend = await asyncio.to_thread(settled_spend, processes[0].url, created["id"], admitted * request_cost() * 0.9)
    assert spend <= budget + request_cost()


@pytest.mark.parametrize("kind", ["one process", "two replicas"])
async def test_30_concurrent_requests_respect_rpm(serve: StartServe, tmp_path: Path, namespace: str,
                                                  kind: str) -> None:
    processes = [serve(*store_flags("redis", tmp_path, namespace))]
    if kind == "two replicas":
        processes.append(serve(*store_flags("redis", tmp_path, namespace)))
    created = create_key(processes[0].url, rpm=10)
    statuses = await burst(processes, created["key"], 30)
    assert statuses.count(200) == 10 and statuses.count(429) == 20


def test_two_replicas_on_one_sqlite_file_share_the_budget(serve: StartServe, upstream: FakeUpstream,
                                                          tmp_path: Path, namespace: str) -> None:
    upstream.responders["/v1/chat/completions"] = worst_case_billing(delay=0.3)
    flags = store_flags("sqlite", tmp_path, namespace)
    processes = [serve(*flags), serve(*flags)]
    budget = 10 * request_cost() + 0.01
    created = create_key(processes[0].url, max_budget_usd=budget)
    statuses = asyncio.run(burst(processes, created["key"], 30, max_tokens=1000))
    assert 1 <= statuses.count(200) <= 11
    assert settled_spend(processes[1].url, created["id"], statuses.count(200) * request_cost() * 0.9) \
        <= budget + request_cost()
    assert spend_of(processes[0].url, created["id"]) == spend_of(processes[1].url, created["id"])


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0", "--optimizer", "none", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_an_open_relay_is_refused_at_start(tmp_path: Path) -> None:
    done = run_serve("--host", "0.0.0.0", "--upstream-api-key", "sk-held", "--client-auth", "off",
                     "--key-store", f"sqlite:{tmp_path / 'keys.db'}")
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert "open relay" in line and "--allow-unauthenticated" in line and "sk-held" not in line


@pytest.mark.parametrize(("values", "refused"), [
    ({"host": "0.0.0.0", "upstream_api_key": "sk-held", "client_auth": "off"}, True),
    ({"host": "::", "upstream_api_key": "sk-held"}, True),  # auto, and no key anywhere
    ({"host": "0.0.0.0", "upstream_api_key": "sk-held", "client_auth": "off", "allow_unauthenticated": True}, False),
    ({"host": "127.0.0.1", "upstream_api_key": "sk-held", "client_auth": "off"}, False),
    ({"host": "::1", "upstream_api_key": "sk-held", "client_auth": "off"}, False),
    ({"host": "0.0.0.0", "client_auth": "off"}, False),  # no key held: the client's own key goes upstream
    ({"host": "0.0.0.0", "upstream_api_key": "sk-held", "client_auth": "on"}, False),
])
def test_the_open_relay_rule(tmp_path: Path, values: dict[str, object], refused: bool) -> None:
    settings = make_settings(key_store=f"sqlite:{tmp_path / 'keys.db'}", **values)
    assert (open_relay_problem(settings) is not None) == refused


def test_a_route_through_litellm_holds_a_key_and_a_stored_key_turns_auto_on(tmp_path: Path) -> None:
    config = tmp_path / "bpo.yaml"
    config.write_text("model_list:\n  - model_name: claude\n    litellm_params: {model: anthropic/claude-x}\n")
    settings = make_settings(host="0.0.0.0", config=str(config), key_store=f"sqlite:{tmp_path / 'keys.db'}")
    assert open_relay_problem(settings) is not None
    store = SqliteKeyStore(str(tmp_path / "keys.db"))
    asyncio.run(_put_one(store))
    assert open_relay_problem(settings) is None


async def _put_one(store: SqliteKeyStore) -> None:
    await store.put(ClientKey(id=new_id(), name="k", key_hash=hash_key("a-client-key-0123456789")))
    await store.close()
