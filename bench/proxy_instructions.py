"""Instructions per request, counted by valgrind: the gateway against the minimal passthrough, deterministically.

Wall-clock throughput on these shared 2-core VMs swings by 1.5x from one minute to the next. Instruction
counts do not: each server runs under ``valgrind --tool=callgrind`` (the fake upstream and the load
generator do not), serves a warm-up, then exactly N requests at 32 concurrent connections; it runs twice
(N small, N large) and the difference over the difference in N is the per-request cost of that server
alone, start-up and warm-up cancelled out. The ratio to the reference estimates the throughput ratio at
32 connections (throughput ~ 1 / CPU per request when the server is the bottleneck), and is the figure to
compare code changes with. Repeat runs agree within ~3%.

    python bench/proxy_instructions.py [--requests 1600] [--concurrency 32] [--tracing]

``--tracing`` also counts both gateways with OpenTelemetry on (``--otel-endpoint`` to a sink on loopback that
accepts every export): the cost of a trace per request, its export included (the exporter's thread runs in
the server's process, so callgrind counts it).

Needs ``valgrind`` (Debian: apt-get install valgrind). Takes ~1 minute a target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from proxy_overhead import BODY, wait_healthy  # noqa: E402

from tests.fakes.upstream import free_port  # noqa: E402

WARMUP = 300


async def send(url: str, requests: int, concurrency: int, key: str = "sk-bench") -> None:
    """Exactly ``requests`` POSTs over ``concurrency`` keep-alive connections; every answer must be a 200."""
    left = requests
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: {response.status}")
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def instructions(command: list[str], port: int, health: str, requests: int, concurrency: int,
                 start_timeout: float = 180, key: str = "sk-bench") -> int:
    """Instructions the server ran from start to exit, having served the warm-up and ``requests``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # The server's log (access lines included) goes to a file: a pipe nobody reads until exit would fill
    # and block the server.
    with tempfile.TemporaryFile("w+") as log_file:
        server = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}{health}", timeout=start_timeout)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            asyncio.run(send(url, WARMUP, concurrency, key))
            asyncio.run(send(url, requests, concurrency, key))
            server.send_signal(signal.SIGINT)
            server.wait(timeout=180)
        finally:
            if server.poll() is None:
                server.kill()
        log_file.seek(0)
        log = log_file.read()
    found = re.search(r"Collected : (\d+)", log)
    if found is None:
        raise RuntimeError(f"callgrind printed no total for {command}:\n{log[-2000:]}")
    return int(found.group(1))


def otlp_sink() -> ThreadingHTTPServer:
    """An OTLP/HTTP receiver on loopback that takes every export and answers 200 (an empty response message)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1600, help="requests measured (beyond a 200-request run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-cache-hit", action="store_true", help="do not count the cache-hit gateway")
    parser.add_argument("--start-timeout", type=float, default=180,
                        help="seconds a server may take to start under valgrind (more on a loaded machine)")
    parser.add_argument("--tracing", action="store_true",
                        help="also count both gateways with OpenTelemetry on, exporting to a sink on loopback")
    parser.add_argument("--servers", default="",
                        help="also count the gateway (optimizer off) on these HTTP servers, comma-separated: "
                             "uvicorn-httptools, uvicorn-h11 (bench/servers.py)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    python, servers = sys.executable, str(REPO / "bench/servers.py")
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    targets = {
        "reference (aiohttp)": ([python, servers, "passthrough", "--upstream", upstream, "--port"], "/"),
        "bpo-proxy, optimizer off": ([python, "-m", "proxy", "serve", "--upstream-base-url", upstream,
                                      "--optimizer", "none", "--port"], "/readyz"),
        "bpo-proxy, cache hit": ([python, "-m", "proxy", "serve", "--upstream-base-url", upstream,
                                  "--optimizer", f"remote:{upstream}", "--port"], "/readyz"),
    }
    if args.skip_cache_hit:
        del targets["bpo-proxy, cache hit"]
    sink = None
    if args.tracing:
        sink = otlp_sink()
        endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
        for name in [name for name in targets if name.startswith("bpo-proxy")]:
            command, health = targets[name]
            targets[f"{name}, traced"] = ([*command[:-1], "--otel-endpoint", endpoint, "--port"], health)
    for server in filter(None, args.servers.split(",")):
        targets[f"bpo-proxy, off, on {server}"] = (
            [python, servers, "gateway", "--server", server, "--upstream", upstream, "--port"], "/readyz")
    lean = subprocess.Popen([python, servers, "upstream", "--port", str(upstream_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{upstream_port}/")
        print(f"callgrind: instructions per request at {args.concurrency} connections, "
              f"({args.requests + 200} - 200 requests) after {WARMUP} warm-up requests", flush=True)
        per_request = {}
        for name, (command, health) in targets.items():
            counts = []
            for requests in (200, args.requests + 200):
                port = free_port()
                counts.append(instructions([*command, str(port)], port, health, requests, args.concurrency,
                                           args.start_timeout))
            per_request[name] = (counts[1] - counts[0]) / args.requests
            print(f"  {name:<28}{per_request[name]:12,.0f}", flush=True)
    finally:
        lean.terminate()
        lean.wait(timeout=15)
        if sink is not None:
            sink.shutdown()
    reference = per_request["reference (aiohttp)"]
    print(f"\n  {'target':<28}{'instr/req':>12}{'x ref':>8}{'~ throughput x ref':>20}")
    for name, count in per_request.items():
        print(f"  {name:<28}{count:12,.0f}{count / reference:8.2f}{reference / count:20.2f}")


if __name__ == "__main__":
    main()
