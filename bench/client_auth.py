"""The added cost of client auth, rate limits and budgets on the fast path, as a ratio to the same gateway
without client auth in the same run: instructions per request counted by callgrind (``proxy_instructions.py``),
so the figure holds on a shared, noisy machine.

Targets (optimizer off, the lean upstream of ``bench/servers.py``):
- no client auth (the reference of this script);
- a client key without limits (auth only: hash, cached lookup, headers stripped);
- a key with rpm, tpm and a budget, SQLite store: one admission transaction per request, settlements batched;
- the same key, Redis store: one Lua script per request, settlements batched.

    python bench/client_auth.py [--requests 1600] [--concurrency 32] [--redis redis://127.0.0.1:6379/0]

Target: <= 10% fewer requests/s than without client auth (throughput ~ 1 / instructions per request).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from proxy_instructions import instructions  # noqa: E402
from proxy_overhead import wait_healthy  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1600, help="requests measured (beyond a 200-request run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the redis:// key store")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
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
            "no client auth": ([*serve, "--client-auth", "off", "--port"], "sk-bench"),
            "auth only, sqlite": ([*serve, *sqlite, "--port"], AUTH_ONLY),
            "auth + limits + budget, sqlite": ([*serve, *sqlite, "--port"], LIMITED),
            "auth only, redis": ([*serve, *redis_store, "--port"], AUTH_ONLY),
            "auth + limits + budget, redis": ([*serve, *redis_store, "--port"], LIMITED),
        }
        lean = subprocess.Popen([python, servers, "upstream", "--port", str(upstream_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{upstream_port}/")
            print(f"callgrind: instructions per request at {args.concurrency} connections", flush=True)
            per_request = {}
            for name, (command, key) in targets.items():
                counts = []
                for requests in (200, args.requests + 200):
                    port = free_port()
                    counts.append(instructions([*command, str(port)], port, "/readyz", requests,
                                               args.concurrency, key))
                per_request[name] = (counts[1] - counts[0]) / args.requests
                print(f"  {name:<34}{per_request[name]:12,.0f}", flush=True)
        finally:
            lean.terminate()
            lean.wait(timeout=15)
            client = redis.Redis.from_url(args.redis)
            stale = list(client.scan_iter(match=f"{namespace}:*"))
            if stale:
                client.delete(*stale)
            client.close()
    reference = per_request["no client auth"]
    print(f"\n  {'target':<34}{'instr/req':>12}{'x off':>8}{'~ req/s x off':>16}")
    for name, count in per_request.items():
        print(f"  {name:<34}{count:12,.0f}{count / reference:8.2f}{reference / count:16.2f}")


if __name__ == "__main__":
    main()
