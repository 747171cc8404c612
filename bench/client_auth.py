"""The added cost of client auth, rate limits and budgets on the fast path, as a ratio to the same gateway
without client auth in the same run.

Targets (optimizer off, the lean upstream of ``bench/servers.py``):
- no client auth (the reference of this script);
- a client key without limits (auth only: the key found among those remembered valid, headers stripped,
  spend summed per key and written every 0.5 s);
- a key with rpm, tpm and a budget, SQLite store: admitted from leases (a store transaction about once a
  second), settlements written every 0.5 s;
- the same key, Redis store (a Lua script per lease and per settlement write).

    python bench/client_auth.py --cpu [--rounds 10] [--requests 3000]   # the figure to use
    python bench/client_auth.py --wall [--rounds 5] [--duration 5]      # requests/s under wrk
    python bench/client_auth.py [--requests 1600] [--concurrency 32] [--redis redis://127.0.0.1:6379/0]

``--cpu``: each server serves a warm-up, then the measured requests, and its CPU time (all its threads',
from ``/proc/PID/task/*/schedstat``) over them is divided by their number; targets are interleaved round by
round and the median kept. CPU time is the server's own, so it suffers less from a busy machine than
requests/s. ``--wall`` measures requests/s itself (wrk, reported as 1e6 / requests/s); on a machine where
the load generator and the upstream share the cores with the gateway it understates the gateway's own cost.

With neither, instructions per request are counted by callgrind (``proxy_instructions.py``, ~10 minutes a
target); under valgrind a request lasts ~50x longer, so the work done once per interval (the settler's
writes, lease refills) is shared by ~50x fewer requests and overstated (``bench/README.md``).

Target: <= 10% fewer requests/s than without client auth (throughput ~ 1 / CPU time per request).
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

import redis
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from proxy_instructions import WARMUP, instructions, send  # noqa: E402
from proxy_overhead import BODY, wait_healthy, wrk  # noqa: E402

from proxy.clients import SETTLE_INTERVAL  # noqa: E402
from tests.fakes.upstream import free_port  # noqa: E402

AUTH_ONLY = "sk-bench-auth-only-0123456789"
LIMITED = "sk-bench-limited-0123456789"


def write_config(directory: Path, upstream: str) -> Path:
    """A priced route for the bench model and two config keys: one without limits, one with all of them."""
    config = {
        "model_list": [{"model_name": "fake-model",
                        "litellm_params": {"model": "openai/fake-model", "api_base": upstream},
                        "model_info": {"input_cost_per_token": 1e-9, "output_cost_per_token": 1e-9}}],
        "keys": [{"name": "bench-auth-only", "key": AUTH_ONLY},
                 {"name": "bench-limited", "key": LIMITED, "rpm": 10**9, "tpm": 10**12, "max_budget_usd": 10**9}],
    }
    path = directory / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far, to the nanosecond: the sum of its threads' ``schedstat`` (``/proc/PID/stat``
    counts clock ticks: ~3 µs a request over 3,000 requests). The server's threads (the key store's, the
    event loop's executor) live as long as it does, so no thread's time is lost between two readings."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@contextlib.contextmanager
def serving(command: list[str]) -> Iterator[tuple[int, str]]:
    """A gateway started with ``command`` + a free port: (its pid, its chat completions URL) once ready."""
    port = free_port()
    server = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/readyz", timeout=120)
        yield server.pid, f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.terminate()
        server.wait(timeout=30)


def cpu_per_request(command: list[str], key: str, requests: int, concurrency: int) -> float:
    """The server's CPU microseconds per request over ``requests``, after a warm-up."""
    with serving(command) as (pid, url):
        asyncio.run(send(url, WARMUP, concurrency, key))
        before = cpu_seconds(pid)
        asyncio.run(send(url, requests, concurrency, key))
        time.sleep(SETTLE_INTERVAL + 0.2)  # the settlements written after the last answer are part of the cost
        return (cpu_seconds(pid) - before) / requests * 1e6


def wall_per_request(command: list[str], key: str, duration: float, concurrency: int, scripts: Path) -> float:
    """Requests/s under wrk at ``concurrency`` connections for ``duration`` s, as µs per request (1e6 / rps)."""
    script = scripts / f"{key}.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    with serving(command) as (_, url):
        wrk(url, 4, 1.0, str(script))  # warm-up: connections, caches, the first lease
        return 1e6 / wrk(url, concurrency, duration, str(script)).rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1600, help="requests measured (beyond a 200-request run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the redis:// key store")
    parser.add_argument("--cpu", action="store_true", help="CPU time per request instead of instruction counts")
    parser.add_argument("--wall", action="store_true",
                        help="requests/s under wrk (--concurrency connections, --duration s) instead")
    parser.add_argument("--duration", type=float, default=5.0, help="--wall: seconds of load per target and round")
    parser.add_argument("--rounds", type=int, default=3, help="--cpu, --wall: interleaved rounds (median kept)")
    args = parser.parse_args()
    if args.wall and shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    if not (args.cpu or args.wall) and shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    python, servers = sys.executable, str(REPO / "bench/servers.py")
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    namespace = f"bpo-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        config = write_config(directory, upstream)
        serve = [python, "-m", "proxy", "serve", "--optimizer", "none", "--upstream-base-url", upstream,
                 "--no-access-log", "--config", str(config)]
        sqlite = ["--key-store", f"sqlite:{directory / 'keys.db'}"]
        redis_store = ["--key-store", args.redis, "--cache-namespace", namespace]
        targets = {
            # Its own store: with client auth off the config's keys are still written to one (the default is
            # ./bpo-keys.db, which a later gateway started here would find and turn client auth on for).
            "no client auth": ([*serve, *sqlite, "--client-auth", "off", "--port"], "sk-bench"),
            "auth only, sqlite": ([*serve, *sqlite, "--port"], AUTH_ONLY),
            "auth + limits + budget, sqlite": ([*serve, *sqlite, "--port"], LIMITED),
            "auth only, redis": ([*serve, *redis_store, "--port"], AUTH_ONLY),
            "auth + limits + budget, redis": ([*serve, *redis_store, "--port"], LIMITED),
        }
        lean = subprocess.Popen([python, servers, "upstream", "--port", str(upstream_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{upstream_port}/")
            if args.cpu or args.wall:
                per_request = measure_interleaved(targets, args, directory)
                unit = "CPU µs/req" if args.cpu else "µs/req wall"
            else:
                per_request = measure_instructions(targets, args)
                unit = "instr/req"
        finally:
            lean.terminate()
            lean.wait(timeout=15)
            client = redis.Redis.from_url(args.redis)
            stale = list(client.scan_iter(match=f"{namespace}:*"))
            if stale:
                client.delete(*stale)
            client.close()
    reference = per_request["no client auth"]
    print(f"\n  {'target':<34}{unit:>12}{'x off':>8}{'~ req/s x off':>16}")
    for name, count in per_request.items():
        print(f"  {name:<34}{count:12,.1f}{count / reference:8.3f}{reference / count:16.3f}")


Targets = dict[str, tuple[list[str], str]]


def measure_interleaved(targets: Targets, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """``--cpu`` or ``--wall``: each target once per round, the median of the rounds kept. The order turns by
    one target each round, so no target always runs first or last: under ``--wall`` the later targets of a
    fixed order ran slower (the shared upstream and machine), and the ratios fell with their place."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            command, key = targets[name]
            if args.wall:
                samples[name].append(wall_per_request(command, key, args.duration, args.concurrency, scratch))
            else:
                samples[name].append(cpu_per_request(command, key, args.requests, args.concurrency))
            print(f"  round {round_ + 1}  {name:<34}{samples[name][-1]:10.1f} µs", flush=True)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_instructions(targets: Targets, args: argparse.Namespace) -> dict[str, float]:
    print(f"callgrind: instructions per request at {args.concurrency} connections", flush=True)
    per_request = {}
    for name, (command, key) in targets.items():
        counts = []
        for requests in (200, args.requests + 200):
            port = free_port()
            counts.append(instructions([*command, str(port)], port, "/readyz", requests, args.concurrency,
                                        start_timeout=600, key=key))
        per_request[name] = (counts[1] - counts[0]) / args.requests
        print(f"  {name:<34}{per_request[name]:12,.0f}", flush=True)
    return per_request


if __name__ == "__main__":
    main()
