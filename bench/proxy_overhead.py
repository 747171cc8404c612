"""Gateway overhead, side by side in one run: direct upstream vs bpo-proxy vs a minimal passthrough.

Starts three processes on loopback (a lean fake upstream, the reference ~30-line aiohttp passthrough, and
``bpo serve``) and drives each with wrk: 1 connection for latency, 32 connections for throughput. Prints the
added latency over calling the upstream directly, and the throughput ratio against the reference.

    python bench/proxy_overhead.py [--duration 5] [--mode off|cache-hit|both]

Needs ``wrk`` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.upstream import free_port  # noqa: E402

BODY = json.dumps({"model": "fake-model", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the reader of this benchmark."}]})


@dataclass
class Load:
    p50_ms: float
    p99_ms: float
    rps: float


def _to_ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if match is None:
        raise RuntimeError(f"unreadable wrk latency {value!r}")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match.group(2)]


def wrk(url: str, connections: int, duration: float, script: str, extra_headers: str = "") -> Load:
    threads = min(connections, 2)
    seconds = f"-d{max(1, round(duration))}s"
    command = ["wrk", f"-t{threads}", f"-c{connections}", seconds, "--latency", "-s", script, url]
    output = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "BPO_BENCH_HEADERS": extra_headers}).stdout
    if "Latency Distribution" not in output:
        raise RuntimeError(f"wrk printed no latency distribution for {url}:\n{output}")
    p50 = _to_ms(re.search(r"50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _to_ms(re.search(r"99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{output}")
    return Load(p50, p99, rps)


def wait_healthy(url: str, timeout: float = 30.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=0.5)
            return time.perf_counter() - started
        time.sleep(0.02)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], health_url: str) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_healthy(health_url)
        yield child, ready
    finally:
        child.terminate()
        child.wait(timeout=15)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_script(directory: str) -> str:
    path = Path(directory) / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(BODY)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Authorization"] = "Bearer sk-bench"\n')
    return str(path)


def measure(name: str, url: str, script: str, duration: float) -> tuple[Load, Load]:
    wrk(url, 4, 1.0, script)  # warm up connections and caches
    one = wrk(url, 1, duration, script)
    many = wrk(url, 32, duration, script)
    print(f"  {name:<22} p50 {one.p50_ms:7.3f} ms   p99 {one.p99_ms:7.3f} ms   "
          f"1 conn {one.rps:8.0f} req/s   32 conn {many.rps:8.0f} req/s", flush=True)
    return one, many


def grow_rss(url: str, pid: int, script: str) -> tuple[float, float]:
    """RSS after ~1k and after ~10k requests: a leak shows as growth between the two."""
    for target in (1_000, 10_000):
        with httpx.Client() as client:
            sent = 0
            while sent < target - (1_000 if target == 10_000 else 0):
                client.post(url, content=BODY, headers={"content-type": "application/json"})
                sent += 1
        if target == 1_000:
            first = rss_mb(pid)
    return first, rss_mb(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--mode", choices=("off", "cache-hit", "both"), default="both",
                        help="proxy with optimization off, with every prompt a cache hit, or both")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10k-request memory check")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    python = sys.executable
    ports = {name: free_port() for name in ("upstream", "reference", "proxy")}
    upstream = f"http://127.0.0.1:{ports['upstream']}/v1"
    with tempfile.TemporaryDirectory() as tmp, \
            process([python, str(REPO / "bench/servers.py"), "upstream", "--port", str(ports["upstream"])],
                    upstream.removesuffix("/v1") + "/"), \
            process([python, str(REPO / "bench/servers.py"), "passthrough", "--port", str(ports["reference"]),
                     "--upstream", upstream], f"http://127.0.0.1:{ports['reference']}/"):
        script = write_script(tmp)
        print(f"wrk: {args.duration:g} s per run; 1 connection for latency, 32 for throughput")
        direct, _ = measure("direct upstream", upstream + "/chat/completions", script, args.duration)
        reference, reference_many = measure("reference passthrough",
                                            f"http://127.0.0.1:{ports['reference']}/v1/chat/completions",
                                            script, args.duration)
        modes = ("off", "cache-hit") if args.mode == "both" else (args.mode,)
        results = {}
        for mode in modes:
            optimizer = "none" if mode == "off" else f"remote:{upstream}"
            proxy_args = [python, "-m", "proxy", "serve", "--port", str(ports["proxy"]), "--upstream-base-url",
                          upstream, "--optimizer", optimizer, "--log-level", "warning"]
            with process(proxy_args, f"http://127.0.0.1:{ports['proxy']}/healthz") as (child, ready):
                url = f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions"
                headers = httpx.post(url, content=BODY, headers={"content-type": "application/json"}).headers
                assert headers["x-bpo-applied"] == ("true" if mode == "cache-hit" else "false"), headers
                one, many = measure(f"bpo-proxy ({mode})", url, script, args.duration)
                if mode == "cache-hit":
                    assert httpx.post(url, content=BODY, headers={
                        "content-type": "application/json"}).headers["x-bpo-cache"] == "hit"
                rss = None if args.skip_rss else grow_rss(url, child.pid, script)
                results[mode] = (one, many, ready, rss)
        print("\nResults (ratios from this one run):")
        print(f"  reference passthrough adds p50 {reference.p50_ms - direct.p50_ms:+.3f} ms, "
              f"p99 {reference.p99_ms - direct.p99_ms:+.3f} ms")
        for mode, (one, many, ready, rss) in results.items():
            print(f"  bpo-proxy ({mode}): adds p50 {one.p50_ms - direct.p50_ms:+.3f} ms (target <= 1.0), "
                  f"p99 {one.p99_ms - direct.p99_ms:+.3f} ms (target <= 3.0); "
                  f"throughput at 32 conn = {many.rps / reference_many.rps:.2f}x the reference (target >= 0.8)")
            print(f"    ready (/healthz 200) {ready:.2f} s after spawn (target <= 2.0)")
            if rss:
                print(f"    RSS after 1k requests {rss[0]:.1f} MB, after 10k {rss[1]:.1f} MB "
                      f"({(rss[1] / rss[0] - 1) * 100:+.1f}%, target within 10%)")


if __name__ == "__main__":
    main()
