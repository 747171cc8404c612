"""The rewrite cache end to end: ``bpo serve`` replicas sharing Redis, driven with the openai SDK.

The fake provider is also the optimizer (``--optimizer remote:URL``), so the number of optimizer calls is
the number of ``/v1/completions`` requests it recorded.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
import redis

from optimizer.cache import cache_key, tenant_of
from tests.fakes.proxy_server import ProxyProcess
from tests.fakes.upstream import FakeUpstream, Recorded, Reply, completion_reply, default_rewrite
from tests.optimizer.cache_helpers import RedisServer

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def serve_args(upstream: FakeUpstream, cache: str, namespace: str, *extra: str) -> list[str]:
    return ["--upstream-base-url", upstream.base_url, "--optimizer", f"remote:{upstream.base_url}",
            "--cache", cache, "--cache-namespace", namespace, "--log-level", "warning", *extra]


def wait_until_ready(proxy: ProxyProcess, timeout: float = 60.0) -> None:
    """The remote optimizer discovers its model in the background; rewrites need it ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(proxy.url + "/readyz").json()["optimizer"]["state"] == "ready":
            return
        time.sleep(0.05)
    raise AssertionError("the optimizer never became ready")


def start_replicas(upstream: FakeUpstream, cache: str, namespace: str, count: int = 2,
                   *extra: str) -> list[ProxyProcess]:
    replicas = [ProxyProcess(serve_args(upstream, cache, namespace, *extra)) for _ in range(count)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            wait_until_ready(replica)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def delete_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    name = f"bpo-e2e-{uuid.uuid4().hex[:12]}"
    yield name
    delete_namespace(name)


@pytest.fixture(scope="module")
def replicas(upstream_server: FakeUpstream, namespace: str) -> Iterator[list[ProxyProcess]]:
    """Two ``bpo serve`` processes sharing the Redis at 127.0.0.1:6379."""
    running = start_replicas(upstream_server, SHARED_REDIS, namespace)
    yield running
    for replica in running:
        replica.stop()


def ask(proxy: ProxyProcess, prompt: str, api_key: str = "sk-client") -> Any:
    client = openai.OpenAI(base_url=proxy.base_url, api_key=api_key, max_retries=0)
    with client:
        return client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": prompt}])


def cache_events(proxy: ProxyProcess) -> dict[str, float]:
    text = httpx.get(proxy.url + "/metrics").text
    found = re.findall(r'^bpo_cache_events_total\{result="(\w+)"\} ([\d.e+]+)$', text, re.MULTILINE)
    return {result: float(value) for result, value in found}


def optimizer_calls(upstream: FakeUpstream) -> int:
    return len(upstream.requests_to("/v1/completions"))


def slow_optimizer(upstream: FakeUpstream, delay: float) -> None:
    def answer(recorded: Recorded) -> Reply:
        return replace(completion_reply(recorded.json), delay=delay)

    upstream.responders["/v1/completions"] = answer


def test_hit_after_miss_across_two_processes(upstream: FakeUpstream, replicas: list[ProxyProcess]) -> None:
    a, b = replicas
    first = ask(a, "List three prime numbers")
    second = ask(b, "List three prime numbers")
    assert (first.headers["x-bpo-cache"], second.headers["x-bpo-cache"]) == ("miss", "hit")
    assert first.headers["x-bpo-applied"] == second.headers["x-bpo-applied"] == "true"
    assert optimizer_calls(upstream) == 1
    sent = [r.json["messages"][0]["content"] for r in upstream.requests_to("/v1/chat/completions")]
    assert sent == [default_rewrite("List three prime numbers")] * 2


def test_forty_concurrent_identical_prompts_over_two_replicas_cost_one_optimizer_call(
        upstream: FakeUpstream, replicas: list[ProxyProcess]) -> None:
    slow_optimizer(upstream, 0.5)  # long enough that all forty requests overlap it
    before = [cache_events(r) for r in replicas]
    prompt = f"Explain photosynthesis to a child ({uuid.uuid4().hex[:6]})"

    async def one(proxy: ProxyProcess) -> Any:
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as client:
            return await client.chat.completions.with_raw_response.create(
                model="fake-model", messages=[{"role": "user", "content": prompt}])

    async def all_of_them() -> list[Any]:
        return await asyncio.gather(*(one(replicas[i % 2]) for i in range(40)))

    responses = asyncio.run(all_of_them())
    assert optimizer_calls(upstream) == 1
    assert all(r.http_response.status_code == 200 and r.headers["x-bpo-applied"] == "true" for r in responses)
    assert sorted(r.headers["x-bpo-cache"] for r in responses) == ["hit"] * 39 + ["miss"]
    sent = {r.json["messages"][0]["content"] for r in upstream.requests_to("/v1/chat/completions")}
    assert sent == {default_rewrite(prompt)}
    after = [cache_events(r) for r in replicas]
    misses = sum(a.get("miss", 0) - b.get("miss", 0) for a, b in zip(after, before, strict=True))
    hits = sum(a.get("hit", 0) - b.get("hit", 0) for a, b in zip(after, before, strict=True))
    assert (misses, hits) == (1, 39)


def test_negative_verdicts_are_shared(upstream: FakeUpstream, replicas: list[ProxyProcess]) -> None:
    upstream.responders["/v1/completions"] = lambda r: completion_reply(r.json, rewrite=lambda p: p)
    first, second = ask(replicas[0], "Keep me as I am"), ask(replicas[1], "Keep me as I am")
    assert first.headers["x-bpo-reason"] == second.headers["x-bpo-reason"] == "unchanged"
    assert (first.headers["x-bpo-cache"], second.headers["x-bpo-cache"]) == ("miss", "hit")
    assert optimizer_calls(upstream) == 1


def test_a_corrupted_value_is_a_miss_not_an_error(upstream: FakeUpstream, replicas: list[ProxyProcess],
                                                   namespace: str) -> None:
    a, b = replicas
    identity = ask(a, "warm-up prompt").headers["x-bpo-optimizer"]
    prompt = "Summarise the plot of Hamlet"
    client = redis.Redis.from_url(SHARED_REDIS)
    client.set(f"{namespace}:rewrite:{cache_key(identity, 'stable', prompt)}", b"{not json at all")
    client.close()
    errors_before = cache_events(a).get("error", 0)
    response = ask(a, prompt)
    assert response.http_response.status_code == 200
    assert (response.headers["x-bpo-cache"], response.headers["x-bpo-applied"]) == ("miss", "true")
    assert cache_events(a).get("error", 0) == errors_before
    assert httpx.get(a.url + "/readyz").json()["cache"]["corrupt_values"] == 1
    assert ask(b, prompt).headers["x-bpo-cache"] == "hit"  # the miss rewrote a good value
    assert optimizer_calls(upstream) == 2


def test_version_change_ttl_and_tenant_scope(upstream: FakeUpstream, namespace: str) -> None:
    """One replica per variant, all on the test's namespace: a new optimizer identity misses, a 1 s TTL
    expires, and per-tenant keys keep API keys apart."""
    other = start_replicas(upstream, SHARED_REDIS, namespace, 1, "--optimizer-model", "bpo-fake",
                           "--cache-ttl-seconds", "1", "--cache-per-tenant")[0]
    try:
        prompt = "Describe a rainbow"
        first = ask(other, prompt, api_key="sk-alice")
        assert first.headers["x-bpo-optimizer"].startswith("remote:bpo-fake")
        assert first.headers["x-bpo-cache"] == "miss"
        key = cache_key(first.headers["x-bpo-optimizer"], "stable", prompt, tenant_of("sk-alice"))
        client = redis.Redis.from_url(SHARED_REDIS)
        assert 0 < client.pttl(f"{namespace}:rewrite:{key}") <= 1000
        assert ask(other, prompt, api_key="sk-alice").headers["x-bpo-cache"] == "hit"
        assert ask(other, prompt, api_key="sk-bob").headers["x-bpo-cache"] == "miss"
        time.sleep(1.1)
        assert client.exists(f"{namespace}:rewrite:{key}") == 0
        client.close()
        assert ask(other, prompt, api_key="sk-alice").headers["x-bpo-cache"] == "miss"
        assert optimizer_calls(upstream) == 3
    finally:
        other.stop()


def test_redis_killed_mid_test_then_restarted(upstream: FakeUpstream) -> None:
    server = RedisServer().start()
    a, b = start_replicas(upstream, server.url, "ns")
    try:
        assert ask(a, "Before the outage").headers["x-bpo-cache"] == "miss"
        assert ask(b, "Before the outage").headers["x-bpo-cache"] == "hit"
        server.kill()
        for index in range(8):
            response = ask(a, f"During the outage #{index}")
            assert response.http_response.status_code == 200 and response.headers["x-bpo-applied"] == "true"
        assert ask(a, "Before the outage").headers["x-bpo-cache"] == "hit"  # the local tier
        ready = httpx.get(a.url + "/readyz").json()
        assert ready["status"] == "degraded" and ready["cache"]["breaker"] in ("open", "half-open")
        assert 3 <= cache_events(a)["error"] < 8

        server.start()
        deadline = time.monotonic() + 60
        while httpx.get(a.url + "/readyz").json()["cache"]["breaker"] != "closed":
            assert time.monotonic() < deadline, "the breaker never closed after Redis came back"
            assert ask(a, f"Probe {time.monotonic()}").http_response.status_code == 200
            time.sleep(0.2)
        assert ask(a, "After the restart").headers["x-bpo-cache"] == "miss"
        assert ask(b, "After the restart").headers["x-bpo-cache"] == "hit"  # shared through Redis again
        assert httpx.get(a.url + "/readyz").json()["status"] == "ready"
    finally:
        for name, replica in (("a", a), ("b", b)):
            print(f"--- replica {name} ---\n{replica.stop()[-4000:]}")  # shown only when the test fails
        server.kill()
