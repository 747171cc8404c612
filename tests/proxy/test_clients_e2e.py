"""Client keys on the real gateway, with the official SDK: auth on every /v1 route, limits, budgets, spend."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.routing import Route

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import StartProxy
from tests.proxy.keys_helpers import (
    ADMIN,
    ADMIN_KEY,
    PRICED_MODEL,
    create_key,
    list_keys,
    priced_config,
    request_cost,
    settled_spend,
    spend_of,
    worst_case_billing,
)

MESSAGES = [{"role": "user", "content": "Tell me about black holes."}]


@pytest.fixture
def keyed(start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> RunningProxy:
    """A gateway with the admin API, a SQLite key store, a priced route and no optimizer."""
    return start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}", optimizer="none",
                       config=priced_config(tmp_path / "bpo.yaml", upstream.base_url), key_cache_seconds=60)


def sdk(proxy: RunningProxy, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, **options)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_admin_keys_are_shown_once_and_listed_with_spend_never_the_key(keyed: RunningProxy) -> None:
    created = create_key(keyed.url, name="team-a", models=["fake-model"], rpm=60, max_budget_usd=5,
                         optimize="off")
    assert created["key"].startswith("sk-bpo-") and len(created["key"]) > 40
    assert created["name"] == "team-a" and created["rpm"] == 60 and created["optimize"] == "off"
    listing = httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN, timeout=30)
    assert created["key"] not in listing.text and "key_hash" not in listing.text
    [listed] = listing.json()["data"]
    assert listed["id"] == created["id"] and listed["spend_usd"] == 0.0 and listed["revoked"] is False


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/admin/keys", {"name": "x"}), ("GET", "/admin/keys", None), ("DELETE", "/admin/keys/key_1", None)])
def test_admin_keys_need_the_admin_key(keyed: RunningProxy, method: str, path: str, body: Any) -> None:
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        response = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == status and response.json()["error"]["code"] in ("invalid_api_key",
                                                                                         "invalid_admin_key")


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"name": ""}', b'{"name": "a", "rpm": -1}',
                                  b'{"name": "a", "optimize": "sometimes"}', b'{"name": "a", "key": "sk-mine"}',
                                  b'{"name": "a", "max_budget_usd": "ten"}', b'{"name": "a", "colour": 1}',
                                  b'{"name": "a", "skip_rules": ["nonsense"]}',
                                  b'{"name": "a", "skip_rules": "json-schema"}'])
def test_bad_key_definitions_are_400(keyed: RunningProxy, body: bytes) -> None:
    response = httpx.post(f"{keyed.url}/admin/keys", content=body, headers=ADMIN, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert list_keys(keyed.url) == []


def test_auto_turns_client_auth_on_with_the_first_key(keyed: RunningProxy, upstream: FakeUpstream) -> None:
    sdk(keyed, "sk-provider").chat.completions.create(model="fake-model", messages=MESSAGES)
    assert upstream.requests_to("/v1/chat/completions")[-1].headers["authorization"] == "Bearer sk-provider"
    created = create_key(keyed.url)
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(keyed, "sk-provider").chat.completions.create(model="fake-model", messages=MESSAGES)
    assert refused.value.status_code == 401 and error_of(refused.value)["code"] == "invalid_api_key"
    sdk(keyed, created["key"]).chat.completions.create(model="fake-model", messages=MESSAGES)


def test_no_key_and_a_wrong_key_are_401(keyed: RunningProxy) -> None:
    create_key(keyed.url)
    response = httpx.post(f"{keyed.base_url}/chat/completions", json={"model": "fake-model", "messages": MESSAGES},
                          timeout=30)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed, "sk-bpo-" + "x" * 43).models.list()


def test_the_client_key_never_goes_upstream(start_proxy: StartProxy, upstream: FakeUpstream,
                                            tmp_path: Path) -> None:
    proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}", client_auth="on",
                        upstream_api_key="sk-upstream-held", optimizer="none")
    key = create_key(proxy.url)["key"]
    client = sdk(proxy, key)
    client.chat.completions.create(model="fake-model", messages=MESSAGES)
    list(client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True))
    client.embeddings.with_raw_response.create(model="fake-embed", input="hello")
    client.models.list()
    httpx.post(f"{proxy.base_url}/files", headers={"x-api-key": key, "authorization": f"Bearer {key}",
                                                   "api-key": key}, timeout=30)
    assert len(upstream.requests) >= 5
    for recorded in upstream.requests:
        assert key not in json.dumps(recorded.headers) and key.encode() not in recorded.body
        assert recorded.headers.get("authorization") == "Bearer sk-upstream-held"


def test_a_model_outside_the_keys_list_is_403(keyed: RunningProxy) -> None:
    key = create_key(keyed.url, models=["fake-model"])["key"]
    sdk(keyed, key).chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk(keyed, key).chat.completions.create(model=PRICED_MODEL, messages=MESSAGES)
    error = error_of(refused.value)
    assert error["code"] == "model_not_allowed" and error["param"] == "model"


def test_rpm_is_429_rate_limit_exceeded_with_retry_after(keyed: RunningProxy) -> None:
    key = create_key(keyed.url, rpm=2)["key"]
    client = sdk(keyed, key)
    for _ in range(2):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert error_of(refused.value)["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 30
    with pytest.raises(openai.RateLimitError):  # the other routes count against the same limit
        client.models.list()


def test_each_rewriting_route_counts_a_request_once_against_rpm(start_proxy: StartProxy, upstream: FakeUpstream,
                                                                tmp_path: Path) -> None:
    """The Responses and Messages routes admit their requests themselves: the every-route check must not
    count them a second time."""
    keyed = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}", optimizer="none",
                        anthropic_base_url=upstream.base_url)
    key = create_key(keyed.url, rpm=3)["key"]
    sdk(keyed, key).responses.create(model="fake-model", input="Tell me about black holes.")
    anthropic_shaped = {"model": "fake-model", "max_tokens": 100, "messages": MESSAGES}
    answered = httpx.post(f"{keyed.url}/v1/messages", json=anthropic_shaped, timeout=30,
                          headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert answered.status_code == 200, answered.text
    sdk(keyed, key).chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        sdk(keyed, key).responses.create(model="fake-model", input="And about neutron stars?")


def test_a_spent_budget_is_budget_exceeded(keyed: RunningProxy, upstream: FakeUpstream) -> None:
    upstream.responders["/v1/chat/completions"] = worst_case_billing()
    created = create_key(keyed.url, max_budget_usd=1.5)
    client = sdk(keyed, created["key"])
    client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, max_tokens=1000)
    settled_spend(keyed.url, created["id"], at_least=1.0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, max_tokens=1000)
    error = error_of(refused.value)
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, max_tokens=100)  # $0.1 still fits


@pytest.mark.parametrize("limits", [{}, {"rpm": 1000, "tpm": 10**6, "max_budget_usd": 100.0}],
                         ids=["no limits", "limits"])
def test_spend_follows_the_upstreams_usage(keyed: RunningProxy, limits: dict[str, Any]) -> None:
    created = create_key(keyed.url, name="spender", **limits)
    reply = sdk(keyed, created["key"]).chat.completions.create(model=PRICED_MODEL, messages=MESSAGES)
    assert reply.usage is not None
    expected = reply.usage.prompt_tokens * 1e-6 + reply.usage.completion_tokens * 1e-3
    assert settled_spend(keyed.url, created["id"], at_least=expected) == pytest.approx(expected)
    metrics = httpx.get(f"{keyed.url}/metrics", timeout=30).text
    counted = re.search(r'bpo_key_spend_usd_total\{key_name="spender"\} ([0-9.e+-]+)', metrics)
    assert counted is not None and float(counted.group(1)) == pytest.approx(expected)
    assert 'bpo_client_requests_total{key_name="spender",outcome="ok"} 1.0' in metrics
    assert created["key"] not in metrics


def test_streams_are_billed_without_showing_the_client_a_usage_chunk(keyed: RunningProxy,
                                                                     upstream: FakeUpstream) -> None:
    created = create_key(keyed.url)
    chunks = list(sdk(keyed, created["key"]).chat.completions.create(model=PRICED_MODEL, messages=MESSAGES,
                                                                     stream=True))
    assert chunks and all(chunk.usage is None and chunk.choices for chunk in chunks)
    sent = upstream.requests_to("/v1/chat/completions")[-1].json
    assert sent["stream_options"] == {"include_usage": True}
    assert settled_spend(keyed.url, created["id"], at_least=1e-6) > 0
    # A client that asked for usage itself still gets it.
    asked = list(sdk(keyed, created["key"]).chat.completions.create(
        model=PRICED_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].choices == []


def test_revoking_a_key_takes_effect_at_once(keyed: RunningProxy) -> None:
    created = create_key(keyed.url)
    client = sdk(keyed, created["key"])
    client.chat.completions.create(model="fake-model", messages=MESSAGES)
    response = httpx.delete(f"{keyed.url}/admin/keys/{created['id']}", headers=ADMIN, timeout=30)
    assert response.status_code == 200 and response.json() == {"id": created["id"], "revoked": True}
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    again = httpx.delete(f"{keyed.url}/admin/keys/{created['id']}", headers=ADMIN, timeout=30)
    assert again.status_code == 404
    [listed] = list_keys(keyed.url)
    assert listed["revoked"] is True


def concrete_requests(proxy: RunningProxy) -> list[tuple[str, str]]:
    """(method, path) for every /v1 route the app has, with a path parameter filled in."""
    requests = [("POST", "/v1/chat/completions")]  # the Gateway's fast path, ahead of the router
    for route in proxy.app.routes:
        if isinstance(route, Route) and route.path.startswith("/v1/"):
            path = re.sub(r"\{[^}]+\}", "anything", route.path)
            requests += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return requests


def test_every_v1_route_needs_a_key_and_respects_a_spent_budget(keyed: RunningProxy,
                                                                upstream: FakeUpstream) -> None:
    """Fails when a route (or a new dispatch path) skips the client check: no key, then a spent key."""
    spent = create_key(keyed.url, max_budget_usd=0.0)
    routes = concrete_requests(keyed)
    assert {"/v1/models", "/v1/bpo/feedback", "/v1/anything"} <= {path for _, path in routes}
    body = {"model": PRICED_MODEL, "messages": MESSAGES, "request_id": "req_1", "score": 1}
    before = len(upstream.requests)
    for method, path in routes:
        anonymous = httpx.request(method, keyed.url + path, json=body, timeout=30)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        broke = httpx.request(method, keyed.url + path, json=body, timeout=30,
                              headers={"Authorization": f"Bearer {spent['key']}"})
        assert broke.status_code == 429 and broke.json()["error"]["code"] == "budget_exceeded", (method, path)
    assert len(upstream.requests) == before  # nothing reached the provider


def test_the_keys_optimize_policy_beats_x_bpo(start_proxy: StartProxy, upstream: FakeUpstream,
                                              tmp_path: Path) -> None:
    proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}", ab_treatment_percent=0)
    off, on = create_key(proxy.url, optimize="off")["key"], create_key(proxy.url, optimize="on")["key"]
    refused = sdk(proxy, off).chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, extra_headers={"X-BPO": "on"})
    assert refused.headers["x-bpo-applied"] == "false" and refused.headers["x-bpo-reason"] == "disabled"
    forced = sdk(proxy, on).chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)
    assert forced.headers["x-bpo-applied"] == "true"  # despite a 0% treatment split
    assert upstream.requests_to("/v1/completions")  # the optimizer ran for the "on" key


def test_a_keys_skip_rules_replace_the_routes(start_proxy: StartProxy, upstream: FakeUpstream,
                                               tmp_path: Path) -> None:
    """Every skip rule is on for the gateway; a key with ``skip_rules: []`` has its JSON-schema requests rewritten."""
    proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}")
    plain = create_key(proxy.url)
    no_rules = create_key(proxy.url, skip_rules=[])
    assert no_rules["skip_rules"] == [] and plain["skip_rules"] is None
    schema = {"type": "json_schema", "json_schema": {"name": "facts", "schema": {"type": "object"}}}
    skipped = sdk(proxy, plain["key"]).chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, response_format=schema)  # type: ignore[arg-type]
    assert skipped.headers["x-bpo-applied"] == "false" and skipped.headers["x-bpo-reason"] == "json-schema"
    rewritten = sdk(proxy, no_rules["key"]).chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, response_format=schema)  # type: ignore[arg-type]
    assert rewritten.headers["x-bpo-applied"] == "true"


def test_events_name_the_key_never_the_key(start_proxy: StartProxy, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}", optimizer="none",
                        events=f"jsonl:{events}")
    created = create_key(proxy.url, name="team-events")
    sdk(proxy, created["key"]).chat.completions.create(model="fake-model", messages=MESSAGES)
    proxy.stop()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["key_name"] for r in records if r["type"] == "request"] == ["team-events"]
    assert created["key"] not in events.read_text()


def test_an_unreachable_store_fails_closed(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = start_proxy(key_store="redis://127.0.0.1:1/0", client_auth="on", optimizer="none")
    response = httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "fake-model", "messages": MESSAGES},
                          headers={"Authorization": "Bearer sk-bpo-whatever-key"}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "key_store_unavailable"
    assert response.headers["retry-after"] == "1"
    assert not upstream.requests_to("/v1/chat/completions")


def test_config_keys_work_from_a_hash(start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    import hashlib

    secret = "sk-team-config-0123456789abcdef"
    config = priced_config(tmp_path / "bpo.yaml", upstream.base_url, keys=[
        {"name": "from-hash", "key_hash": "sha256:" + hashlib.sha256(secret.encode()).hexdigest(), "rpm": 1}])
    proxy = start_proxy(key_store=f"sqlite:{tmp_path / 'keys.db'}", optimizer="none", config=config)
    client = sdk(proxy, secret)
    client.chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        sdk(proxy, "sk-provider").chat.completions.create(model="fake-model", messages=MESSAGES)


async def test_30_concurrent_requests_never_overspend_a_budget_for_10(keyed: RunningProxy,
                                                                      upstream: FakeUpstream) -> None:
    upstream.responders["/v1/chat/completions"] = worst_case_billing(delay=0.3)  # all 30 in flight at once
    created = create_key(keyed.url, max_budget_usd=10 * request_cost() + 0.01)
    client = openai.AsyncOpenAI(base_url=keyed.base_url, api_key=created["key"], max_retries=0,
                                http_client=None, timeout=60)

    async def one() -> bool:
        try:
            await client.chat.completions.create(model=PRICED_MODEL, messages=MESSAGES, max_tokens=1000)
            return True
        except openai.RateLimitError as exc:
            assert error_of(exc)["code"] == "budget_exceeded"
            return False

    results = await asyncio.gather(*(one() for _ in range(30)))
    await client.close()
    budget = 10 * request_cost() + 0.01
    spend = await asyncio.to_thread(settled_spend, keyed.url, created["id"], sum(results) * 0.9)
    assert 1 <= sum(results) <= 11
    assert spend <= budget + request_cost()


async def test_30_concurrent_requests_respect_rpm(keyed: RunningProxy) -> None:
    created = create_key(keyed.url, rpm=10)
    client = openai.AsyncOpenAI(base_url=keyed.base_url, api_key=created["key"], max_retries=0, timeout=60)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="fake-model", messages=MESSAGES)
            return 200
        except openai.RateLimitError:
            return 429

    statuses = await asyncio.gather(*(one() for _ in range(30)))
    await client.close()
    assert statuses.count(200) == 10 and statuses.count(429) == 20


def test_spend_of_a_revoked_key_stays_listed(keyed: RunningProxy) -> None:
    created = create_key(keyed.url)
    sdk(keyed, created["key"]).chat.completions.create(model=PRICED_MODEL, messages=MESSAGES)
    spent = settled_spend(keyed.url, created["id"], at_least=1e-6)
    httpx.delete(f"{keyed.url}/admin/keys/{created['id']}", headers=ADMIN, timeout=30)
    assert spend_of(keyed.url, created["id"]) == spent > 0


def test_the_shadow_judges_control_call_is_charged_to_the_key(start_proxy: StartProxy, upstream: FakeUpstream,
                                                       tmp_path: Path) -> None:
    from tests.fakes.upstream import chat_reply

    judge = FakeUpstream().start()
    judge.responders["/v1/chat/completions"] = lambda r: chat_reply(r.json, "Both are fine. [[C]]")
    try:
        proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}",
                            config=priced_config(tmp_path / "bpo.yaml", upstream.base_url), shadow_rate=1.0,
                            shadow_judge_model="judge-model", shadow_judge_base_url=judge.base_url)
        created = create_key(proxy.url)  # rewritten treatment traffic is what the shadow judges
        reply = sdk(proxy, created["key"]).chat.completions.create(model=PRICED_MODEL, messages=MESSAGES)
        assert reply.usage is not None
        main = reply.usage.prompt_tokens * 1e-6 + reply.usage.completion_tokens * 1e-3
        deadline = time.monotonic() + 30
        while len(judge.requests_to("/v1/chat/completions")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The control answer the judge compares with went to the same priced route: at least its 11 prompt
        # tokens and one completion token are charged on top of the request's own cost.
        control = 11 * 1e-6 + 1e-3
        assert settled_spend(proxy.url, created["id"], at_least=main + control) >= main + control
        assert created["key"] not in json.dumps([r.headers for r in judge.requests])
    finally:
        judge.stop()
