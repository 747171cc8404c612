"""The request shapes side by side: added latency of /v1/responses and /v1/messages vs chat completions, and
how much of each conversation request stays a prefix of the next, with and without --rewrite-history.

    python bench/request_shapes.py [--rounds 300] [--turns 10]

Latency: the fake upstream (``tests/fakes/upstream.py``, a process) and ``bpo serve`` (a process, a remote:
optimizer on the same fake) on loopback; one client sends, round robin so the machine's noise falls on every
route alike, the same small conversation to each route through the gateway and directly to the upstream.
Two modes: ``X-BPO: off`` (the byte-for-byte relay) and a rewrite served from the cache (the hot path of a
rewriting gateway). Added latency = median through the gateway - median direct; the ratio is per route
against chat, from the same run.

Prefix stability: a 10-turn conversation per shape through an in-process gateway; for each request, the
share of its conversation bytes (the items list as the provider received it, without its closing bracket)
that is a prefix of the next request's. With history replay every earlier turn is sent as it was: 100%.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.proxy_server import RunningProxy, make_settings  # noqa: E402
from tests.fakes.upstream import FakeUpstream, free_port  # noqa: E402

PROMPT = "Say hello to the reader of this benchmark."
ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {  # route -> (path, items field, body)
    "chat": ("/v1/chat/completions", "messages", {"model": "fake-model", "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": PROMPT}]}),
    "responses": ("/v1/responses", "input", {"model": "fake-model", "instructions": "You are a helpful assistant.",
                                             "input": [{"role": "user", "content": PROMPT}]}),
    "messages": ("/v1/messages", "messages", {"model": "claude-fake", "max_tokens": 64,
                                              "system": "You are a helpful assistant.",
                                              "messages": [{"role": "user", "content": PROMPT}]}),
}


@contextlib.contextmanager
def process(args: list[str], health_url: str) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(health_url, timeout=1).status_code < 500:
                    break
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError(f"{args[:4]} did not start")
            time.sleep(0.1)
        yield
    finally:
        child.terminate()
        child.wait(timeout=15)


def latency(rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per (route, way): way is direct, off (X-BPO: off) or hit (a cached rewrite)."""
    upstream_port, gateway_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    gateway = f"http://127.0.0.1:{gateway_port}"
    serve = [sys.executable, "-m", "proxy", "serve", "--port", str(gateway_port), "--upstream-base-url",
             upstream + "/v1", "--anthropic-base-url", upstream, "--optimizer", f"remote:{upstream}/v1",
             "--no-access-log", "--log-level", "warning"]
    samples: dict[tuple[str, str], list[float]] = {}
    with process([sys.executable, "-m", "tests.fakes.upstream", "--port", str(upstream_port)],
                 upstream + "/v1/models"), process(serve, gateway + "/healthz"), httpx.Client(timeout=30) as client:
        ways = {"direct": (upstream, {}), "off": (gateway, {"x-bpo": "off"}), "hit": (gateway, {"x-bpo": "on"})}
        for round_number in range(rounds + 5):  # the first rounds warm the pools and fill the cache
            for route, (path, _, body) in ROUTES.items():
                for way, (base, headers) in ways.items():
                    started = time.perf_counter()
                    response = client.post(base + path, json=body, headers=headers)
                    elapsed = (time.perf_counter() - started) * 1000
                    if response.status_code != 200:
                        raise RuntimeError(f"{route} {way}: {response.status_code} {response.text[:200]}")
                    if round_number >= 5:
                        samples.setdefault((route, way), []).append(elapsed)
    return {route: {way: statistics.median(samples[(route, way)]) for way in ("direct", "off", "hit")}
            for route in ROUTES}


def prefix_share(earlier: bytes, later: bytes) -> float:
    common = 0
    for a, b in zip(earlier, later, strict=False):
        if a != b:
            break
        common += 1
    return common / len(earlier)


def conversation(route: str, replay: str, turns: int, upstream: FakeUpstream) -> float:
    """Mean prefix share over a ``turns``-turn conversation on ``route``."""
    proxy = RunningProxy(make_settings(upstream_base_url=upstream.base_url, anthropic_base_url=upstream.base_url,
                                       optimizer=f"remote:{upstream.base_url}", rewrite_history=replay,
                                       access_log=False)).start()
    path, field, body = ROUTES[route]
    items: list[dict[str, Any]] = []
    seen: list[bytes] = []
    try:
        with httpx.Client(timeout=30) as client:
            for turn in range(turns):
                items.append({"role": "user", "content": f"Turn {turn + 1}: tell me one more fact about llamas."})
                answer = client.post(proxy.url + path, json={**body, field: items}).json()
                text = (answer.get("choices") or [{}])[0].get("message", {}).get("content") if route == "chat" \
                    else (answer["output"][0]["content"][0]["text"] if route == "responses"
                          else answer["content"][0]["text"])
                items.append({"role": "assistant", "content": text})
                sent = upstream.requests_to(path)[-1].json[field]
                seen.append(json.dumps(sent).encode()[:-1])
    finally:
        proxy.stop()
        upstream.clear()
    shares = [prefix_share(a, b) for a, b in itertools.pairwise(seen)]
    return statistics.mean(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=300, help="measured requests per route and way")
    parser.add_argument("--turns", type=int, default=10, help="turns of the prefix-stability conversation")
    args = parser.parse_args()
    upstream = FakeUpstream().start()
    try:
        print(f"prefix stability over {args.turns} turns (share of each request's conversation bytes that "
              "is a prefix of the next):")
        for route in ROUTES:
            on, off = (conversation(route, replay, args.turns, upstream) for replay in ("on", "off"))
            print(f"  {route:10s} --rewrite-history on: {on:6.1%}   off: {off:6.1%}")
    finally:
        upstream.stop()
    medians = latency(args.rounds)
    print(f"\nmedian latency, {args.rounds} sequential requests per route and way (ms):")
    print(f"  {'route':10s} {'direct':>7s} {'off':>7s} {'hit':>7s}  {'added off':>9s} {'added hit':>9s}"
          "  ratio to chat (off / hit)")
    chat = medians["chat"]
    for route, m in medians.items():
        added_off, added_hit = m["off"] - m["direct"], m["hit"] - m["direct"]
        ratio_off = added_off / (chat["off"] - chat["direct"])
        ratio_hit = added_hit / (chat["hit"] - chat["direct"])
        print(f"  {route:10s} {m['direct']:7.2f} {m['off']:7.2f} {m['hit']:7.2f}  {added_off:9.2f} {added_hit:9.2f}"
              f"  {ratio_off:.2f} / {ratio_hit:.2f}")


if __name__ == "__main__":
    main()
