"""Rewrite-cache benchmark: coalescing over two replicas sharing Redis, and the cache-hit path overhead.

Three measurements, side by side in one run, on loopback:

1. end to end: N identical concurrent chat completions spread over two ``bpo serve`` replicas sharing a
   Redis -> how many optimizer calls the fake optimizer saw, and when each response finished relative
   to the leader's (the one answered ``X-BPO-Cache: miss``);
2. the cache alone: two processes (the "replicas"), each with a ``RedisCache`` and N/2 concurrent
   ``get_or_compute`` calls of one key, the optimizer replaced by a sleep -> computations, and how long
   after the leader's computation ends each waiter gets the value (same process: shared future; other
   process: Redis pub/sub);
3. the cache-hit path: added latency over calling the upstream directly, with wrk (1 connection for p50,
   32 for throughput), for ``--cache redis://`` hits from the local tier and from Redis itself.

    python bench/cache_coalescing.py [--requests 100] [--rounds 5] [--optimizer-delay 0.2] [--duration 5]

Starts its own redis-server (or uses --redis URL with a fresh namespace), a fake upstream whose
``/v1/completions`` is a slow counting optimizer, and the replicas. Part 3 needs ``wrk``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.fakes.upstream import TEMPLATE_HEAD, free_port  # noqa: E402

CHAT_RESPONSE = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}}).encode()
MODELS = json.dumps({"object": "list", "data": [
    {"id": "bpo-bench", "object": "model", "created": 0, "owned_by": "bench"}]}).encode()


# -- the fake upstream (its own process, so its CPU is apart from the replicas') ----------------------

def run_upstream(port: int, optimizer_delay: float) -> None:
    """Chat completions answered at once; ``/v1/completions`` is an optimizer that takes ``delay``."""
    from aiohttp import web

    calls = {"optimizer": 0}

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=CHAT_RESPONSE, content_type="application/json")

    async def completion(request: web.Request) -> web.Response:
        calls["optimizer"] += 1
        prompt = str((await request.json()).get("prompt", ""))
        inner = prompt.split(TEMPLATE_HEAD, 1)[-1].rsplit(" [/INST]", 1)[0]
        await asyncio.sleep(optimizer_delay)
        return web.json_response({"id": "cmpl-bench", "object": "text_completion", "model": "bpo-bench",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "text": f" {inner} Please answer step by step."}]})

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=MODELS, content_type="application/json")

    async def optimizer_calls(request: web.Request) -> web.Response:
        return web.json_response({"calls": calls["optimizer"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completion)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/bench/optimizer-calls", optimizer_calls)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- processes -----------------------------------------------------------------------------------------

def wait_for(url: str, ok: Any = lambda response: True, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError, ValueError):
            if ok(httpx.get(url, timeout=0.5)):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def spawned(args: list[str], ready_url: str | None = None, ok: Any = lambda r: True) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if ready_url:
            wait_for(ready_url, ok)
        yield
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with spawned(command):
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def replica(upstream: str, cache: str, namespace: str, *extra: str) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream-base-url", upstream,
            "--optimizer", f"remote:{upstream}", "--cache", cache, "--cache-namespace", namespace,
            "--log-level", "error", *extra]
    url = f"http://127.0.0.1:{port}"
    with spawned(args, url + "/readyz", lambda r: r.json()["optimizer"]["state"] == "ready"):
        yield url


# -- 1. end to end ----------------------------------------------------------------------------------------

async def fire(urls: list[str], prompt: str, count: int) -> list[tuple[float, str, str]]:
    """``count`` identical requests at once, round-robin over ``urls``: (finish time, replica, cache)."""
    import aiohttp

    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(url: str) -> tuple[float, str, str]:
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers={"content-type": "application/json"}) as response:
                await response.read()
                assert response.status == 200, response.status
                return time.perf_counter(), url, response.headers["x-bpo-cache"]

        return await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(count)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(lags_ms: list[float]) -> str:
    if not lags_ms:
        return "n/a"
    return (f"p50 {statistics.median(lags_ms):6.2f} ms  p99 {percentile(lags_ms, 0.99):6.2f} ms  "
            f"max {max(lags_ms):6.2f} ms")


def end_to_end(args: argparse.Namespace, redis: str) -> None:
    import httpx

    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"\n1. end to end: {args.requests} identical concurrent requests over 2 replicas, "
          f"optimizer takes {args.optimizer_delay * 1000:.0f} ms, {args.rounds} rounds")
    with spawned([sys.executable, __file__, "upstream", "--port", str(upstream_port),
                  "--optimizer-delay", str(args.optimizer_delay)], upstream + "/models"), \
            replica(upstream, redis, namespace) as a, replica(upstream, redis, namespace) as b:
        same, other, spread_coalesced, spread_hits = [], [], [], []
        for round_index in range(args.rounds):
            before = httpx.get(upstream.removesuffix("/v1") + "/bench/optimizer-calls").json()["calls"]
            prompt = f"Plan a three-day trip to Lisbon (round {round_index} {uuid.uuid4().hex[:6]})"
            results = asyncio.run(fire([a, b], prompt, args.requests))
            # The same burst again, now all local-tier hits: the spread this machine adds without coalescing.
            baseline = asyncio.run(fire([a, b], prompt, args.requests))
            spread_coalesced += [(r[0] - min(x[0] for x in results)) * 1000 for r in results]
            spread_hits += [(r[0] - min(x[0] for x in baseline)) * 1000 for r in baseline]
            calls = httpx.get(upstream.removesuffix("/v1") + "/bench/optimizer-calls").json()["calls"] - before
            leaders = [r for r in results if r[2] == "miss"]
            print(f"  round {round_index}: optimizer calls {calls}, responses: "
                  f"{len(leaders)} miss, {sum(r[2] == 'hit' for r in results)} hit")
            if len(leaders) != 1:
                continue
            leader_time, leader_url, _ = leaders[0]
            for finished, url, cache in results:
                if cache == "hit":
                    (same if url == leader_url else other).append((finished - leader_time) * 1000)
        print(f"  waiters finished after the leader's response, same replica:  {describe(same)}")
        print(f"  waiters finished after the leader's response, other replica: {describe(other)}")
        print(f"  finish spread (after the first response), coalesced burst:  {describe(spread_coalesced)}")
        print(f"  finish spread (after the first response), all-hit burst:    {describe(spread_hits)}")
        print("  (the spread includes every request's own upstream call and response on the shared cores;"
              " the all-hit burst is that floor)")


# -- 2. the cache alone -----------------------------------------------------------------------------------

async def cache_worker(redis: str, namespace: str, key: str, count: int, delay: float) -> None:
    """One "replica": says ready, reads the shared start time, makes ``count`` concurrent get_or_compute
    calls and prints its timings as JSON."""
    from optimizer.cache import CachedRewrite, LocalTier
    from optimizer.redis_cache import RedisCache

    cache = RedisCache(redis, LocalTier(1000, 1 << 20, 3600), namespace=namespace)
    await cache.start()
    while not cache.subscribed:
        await asyncio.sleep(0.001)
    computed: list[float] = []

    async def compute() -> CachedRewrite:
        await asyncio.sleep(delay)
        computed.append(time.time())
        return CachedRewrite("rewritten", "applied", "bench@1", time.time())

    async def call() -> tuple[float, bool]:
        _, hit = await cache.get_or_compute(key, compute)
        return time.time(), hit

    print("ready", flush=True)
    start_at = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    returned = await asyncio.gather(*(call() for _ in range(count)))
    await cache.close()
    print(json.dumps({"computed": computed, "returned": returned}), flush=True)


def cache_alone(args: argparse.Namespace, redis: str) -> None:
    print(f"\n2. the cache alone: {args.requests} concurrent get_or_compute of one key over 2 processes, "
          f"compute takes {args.optimizer_delay * 1000:.0f} ms, {args.rounds} rounds")
    same, other, computations, stores = [], [], [], []
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_index in range(args.rounds):
        workers = [subprocess.Popen([sys.executable, __file__, "cache-worker", "--redis", redis,
                                     "--namespace", namespace, "--key", f"round-{round_index}",
                                     "--count", str(args.requests // 2), "--optimizer-delay",
                                     str(args.optimizer_delay)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(2)]
        for worker in workers:  # both imported, connected and subscribed before anyone starts
            assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
        start_at = f"{time.time() + 0.1}\n".encode()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(start_at)
            worker.stdin.flush()
        reports = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
        computed = [t for report in reports for t in report["computed"]]
        computations.append(len(computed))
        if len(computed) != 1:
            continue
        leader = next(i for i, report in enumerate(reports) if report["computed"])
        leader_returned = next(t for t, hit in reports[leader]["returned"] if not hit)
        stores.append((leader_returned - computed[0]) * 1000)
        for index, report in enumerate(reports):
            lags = [(t - leader_returned) * 1000 for t, hit in report["returned"] if hit]
            (same if index == leader else other).extend(lags)
    print(f"  computations per round: {computations}")
    print(f"  leader's call returned after its computation ended (local tier + Redis write): {describe(stores)}")
    print(f"  waiters got the value after the leader's call returned, same process:  {describe(same)}")
    print(f"  waiters got the value after the leader's call returned, other process: {describe(other)}")


# -- 3. cache-hit overhead --------------------------------------------------------------------------------

HIT_BODY = json.dumps({"model": "fake-model", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the reader of this benchmark."}]})


def wrk(url: str, connections: int, duration: float, script: str) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of one wrk run."""
    import re

    command = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{max(1, round(duration))}s",
               "--latency", "-s", script, url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        raise RuntimeError(f"{url} answered errors:\n{output}")

    def ms(label: str) -> float:
        number, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", output).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return ms("50%"), ms("99%"), rps


def hit_overhead(args: argparse.Namespace, redis: str) -> None:
    import httpx

    if shutil.which("wrk") is None:
        print("\n3. skipped: wrk is needed (apt-get install wrk)")
        return
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    print(f"\n3. cache-hit path over direct upstream: wrk, 1 connection, {args.duration:g} s per run, "
          f"{args.rounds} interleaved rounds (medians)")
    variants = {"memory": ("memory",), "redis, local-tier hit": (redis,),
                "redis, Redis-tier hit": (redis, "--cache-max-entries", "0")}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.enter_context(spawned([sys.executable, __file__, "upstream", "--port", str(upstream_port),
                                     "--optimizer-delay", "0"], upstream + "/models"))
        script = str(Path(tmp) / "post.lua")
        Path(script).write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(HIT_BODY)}\n'
                                'wrk.headers["Content-Type"] = "application/json"\n')
        targets = {"direct upstream": upstream + "/chat/completions"}
        for name, (cache, *extra) in variants.items():
            url = stack.enter_context(replica(upstream, cache, f"bench-{uuid.uuid4().hex[:8]}", *extra))
            targets[name] = url + "/v1/chat/completions"
            for expected in ("miss", "hit"):
                headers = httpx.post(targets[name], content=HIT_BODY, timeout=10,
                                     headers={"content-type": "application/json"}).headers
                assert headers["x-bpo-cache"] == expected and headers["x-bpo-applied"] == "true", headers
        for url in targets.values():
            wrk(url, 4, 1.0, script)  # warm up connections
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, url in targets.items():
                runs[name].append(wrk(url, 1, args.duration, script))
    direct_p50 = statistics.median(run[0] for run in runs["direct upstream"])
    direct_p99 = statistics.median(run[1] for run in runs["direct upstream"])
    print(f"  direct upstream: p50 {direct_p50:.3f} ms, p99 {direct_p99:.3f} ms")
    for name in variants:
        p50 = statistics.median(run[0] for run in runs[name])
        p99 = statistics.median(run[1] for run in runs[name])
        print(f"  {name:<24} p50 {p50:.3f} ms: adds {p50 - direct_p50:+.3f} ms p50 (target <= 1.5), "
              f"{p99 - direct_p99:+.3f} ms p99")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="run", choices=("run", "upstream", "cache-worker"),
                        help="run the benchmark (default); the others are its child processes")
    parser.add_argument("--requests", type=int, default=100, help="identical concurrent requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each with a new prompt")
    parser.add_argument("--optimizer-delay", type=float, default=0.2, help="seconds one optimizer call takes")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (part 3)")
    parser.add_argument("--redis", default=None, help="use this Redis (default: start a private one)")
    parser.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. 1,2")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port, args.optimizer_delay)
        return
    if args.role == "cache-worker":
        asyncio.run(cache_worker(args.redis, args.namespace, args.key, args.count, args.optimizer_delay))
        return
    parts = set(args.parts.split(","))
    with redis_url(args.redis) as redis:
        print(f"Redis: {redis}; {os.cpu_count()} CPUs")
        if "1" in parts:
            end_to_end(args, redis)
        if "2" in parts:
            cache_alone(args, redis)
        if "3" in parts:
            hit_overhead(args, redis)


if __name__ == "__main__":
    main()
