"""Property-based fuzzing of the gateway's JSON routes: any body gets an answer below 500, in time.

A real gateway on loopback in front of the fake provider; hypothesis writes the bodies (odd strings with lone
surrogate escapes, deep nesting, wrong types, half-valid chat completions). Seeded (``derandomize``) and
bounded, so the suite stays repeatable and quick on a busy machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.proxy_server import RunningProxy
from tests.fakes.upstream import FakeUpstream, Recorded, Reply, sse_chunks

from .conftest import StartProxy

ADMIN_KEY = "admin-fuzz"
DEEP = "\x00deep\x00"  # a string the strategies never write: replaced by raw nested arrays in the body
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Odd text: any code point, lone surrogates included (json.dumps writes them as \\udXXX escapes).
odd_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
words = st.sampled_from(["", " ", "hi", "Describe the chart", "fake-model", "bpo-fake", "user", "text", "\ud800"])
text = st.one_of(words, odd_text)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), text,
                   st.just(DEEP))
anything = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually ``strategy``'s value, sometimes any JSON value at all."""
    return st.one_of(strategy, strategy, strategy, anything)


text_part = st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(text)})
other_part = st.fixed_dictionaries({"type": maybe(st.sampled_from(["image_url", "input_audio", "file"])),
                                    "image_url": anything})
content = st.one_of(text, st.none(), st.lists(st.one_of(text_part, text_part, other_part), max_size=6), anything)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user", "user", "assistant", "system", "tool"])), "content": content},
    optional={"name": text, "tool_calls": anything, "tool_call_id": text})
extras = {"stream": maybe(st.booleans()), "user": maybe(text), "n": anything, "temperature": anything,
          "stream_options": anything, "tools": anything, "x": anything}
earlier_turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    text, st.lists(st.one_of(text_part, other_part), min_size=1, max_size=6))})
# Half the bodies are well-formed chat completions with odd values (they reach the optimizer and upstream).
chat_body = st.one_of(
    st.fixed_dictionaries({"model": st.sampled_from(["fake-model", "fake-\udc00"]),
                           "messages": st.tuples(st.lists(earlier_turn, max_size=3), user_turn).map(
                               lambda pair: [*pair[0], pair[1]])}, optional=extras),
    st.fixed_dictionaries({"model": maybe(st.one_of(st.just("fake-model"), text)),
                           "messages": maybe(st.lists(maybe(message), max_size=5))}, optional=extras))
feedback_body = st.fixed_dictionaries({"request_id": maybe(text), "score": maybe(st.floats())},
                                      optional={"comment": maybe(text), "x": anything})
# Never a real optimizer spec: the fuzz must not swap the optimizer or load a model from anywhere.
odd_spec = text.filter(lambda value: not value.strip().lower().startswith(("hf:", "remote:", "llm:", "none")))
reload_body = st.one_of(st.fixed_dictionaries({}, optional={"optimizer": maybe(odd_spec), "x": anything}),
                        anything.filter(lambda value: not isinstance(value, dict)))
key_body = st.fixed_dictionaries({"name": maybe(text)}, optional={
    "models": maybe(st.lists(text, max_size=3)), "rpm": maybe(st.integers(-5, 10**20)),
    "tpm": maybe(st.integers(-5, 10**20)), "max_budget_usd": maybe(st.floats()),
    "optimize": maybe(st.sampled_from(["on", "off", "default"])), "x": anything})
depth = st.one_of(st.just(0), st.just(0), st.integers(1, 1100))


def encode(body: Any, nesting: int, garbage: bytes) -> bytes:
    """The body as JSON bytes (lone surrogates escaped), its DEEP marks as ``nesting`` arrays, maybe cut short."""
    raw = json.dumps(body).encode()
    deep = ("[" * nesting + "]" * nesting).encode() if nesting else b"null"
    raw = raw.replace(json.dumps(DEEP).encode(), deep)
    return raw[: len(raw) // 2] + garbage if garbage else raw


garbage = st.one_of(st.just(b""), st.just(b""), st.just(b""), st.binary(min_size=1, max_size=8))


def answer_without_reading(recorded: Recorded) -> Reply:
    """The fake provider's answer, whatever the body (its JSON reader would give up on deep nesting)."""
    if b'"stream": true' in recorded.body:
        return Reply(sse=sse_chunks("fake-model", "ok"))
    return Reply(json={"id": "chatcmpl-fuzz", "object": "chat.completion", "choices": []})


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert isinstance(response.json()["error"]["message"], str), response.text[:500]


def run(proxy: RunningProxy, example: Callable[[httpx.Client], Any]) -> None:
    with httpx.Client(base_url=proxy.url, timeout=60) as http:  # a hang fails the example, not the suite
        example(http)


def test_chat_bodies_never_make_a_5xx(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    upstream.responders["/v1/chat/completions"] = answer_without_reading
    proxy = start_proxy(ab_treatment_percent=50)

    def example(http: httpx.Client) -> None:
        @settings(FUZZ, max_examples=200)
        @given(body=chat_body, nesting=depth, cut=garbage,
               override=st.sampled_from(["", "on", "off", "aggressive", "maybe"]),
               user=st.sampled_from(["", "u-1", "\xe9t\xe9"]))
        def one(body: Any, nesting: int, cut: bytes, override: str, user: str) -> None:
            headers = {"content-type": "application/json", "x-bpo-debug": "1", "x-bpo": override}
            if user:
                headers["x-bpo-user"] = user.encode("latin-1")  # type: ignore[assignment]
            check(http.post("/v1/chat/completions", content=encode(body, nesting, cut), headers=headers))

        one()

    run(proxy, example)
    assert upstream.requests_to("/v1/completions"), "no example reached the optimizer"


def test_feedback_bodies_never_make_a_5xx(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(events="none")

    def example(http: httpx.Client) -> None:
        @FUZZ
        @given(body=maybe(feedback_body), nesting=depth, cut=garbage)
        def one(body: Any, nesting: int, cut: bytes) -> None:
            check(http.post("/v1/bpo/feedback", content=encode(body, nesting, cut),
                            headers={"content-type": "application/json"}))

        one()

    run(proxy, example)


def test_admin_bodies_never_make_a_5xx(upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = start_proxy(admin_key=ADMIN_KEY, key_store=f"sqlite:{tmp_path / 'keys.db'}")

    def example(http: httpx.Client) -> None:
        @FUZZ
        @given(request=st.one_of(st.tuples(st.just("POST /admin/optimizer/reload"), reload_body),
                                 st.tuples(st.just("POST /admin/keys"), maybe(key_body)),
                                 st.tuples(text.map(lambda key_id: "DELETE /admin/keys/" + quote(key_id, safe="")),
                                           st.none())),
               nesting=depth, cut=garbage, key=st.sampled_from([ADMIN_KEY, ADMIN_KEY, "", "wrong", ADMIN_KEY + "\xe9"]))
        def one(request: tuple[str, Any], nesting: int, cut: bytes, key: str) -> None:
            (method, path), body = request[0].split(" ", 1), request[1]
            auth = f"Bearer {key}".strip().encode("latin-1")
            check(http.request(method, path, content=encode(body, nesting, cut),
                               headers={"content-type": "application/json", "authorization": auth}))  # type: ignore[dict-item]

        one()

    run(proxy, example)
    assert proxy.app.state.optimizer.identity.startswith("remote:"), "the fuzz swapped the optimizer"
