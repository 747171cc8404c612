"""Gateway overhead, side by side in one run: direct upstream vs bpo-proxy vs a minimal passthrough.

Starts on loopback a lean fake upstream, the reference ~30-line passthrough (with aiohttp, and with httpx:
the fast path's client was chosen on this), and ``bpo serve`` twice (optimizer off; every prompt a cache
hit), then drives each in turn with wrk: 1 connection for latency, 32 connections for throughput. Prints the
added latency over calling the upstream directly, and the throughput ratio against the reference.

    python bench/proxy_overhead.py [--duration 5] [--rounds 5] [--skip-rss]

This machine class is noisy (a shared VM: the same server's CPU per request swings by 1.5x from minute to
minute), so the ratios to the reference are paired per round and their median is reported with the range.
``bench/proxy_instructions.py`` counts instructions instead: deterministic, for comparing code changes.

Needs ``wrk`` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
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

from bench.servers import SERVERS  # noqa: E402
from tests.fakes.upstream import free_port  # noqa: E402

BODY = json.dumps({"model": "fake-model", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the reader of this benchmark."}]})


@dataclass
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    cpu_us_per_request: float = float("nan")


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
    p50 = _to_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _to_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{output}")
    return Load(p50, p99, rps, requests)


def wait_healthy(url: str, timeout: float = 30.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=0.5).status_code < 500:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (workers): CPU per request is far steadier than
    req/s on a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(cpu_seconds(int(child)) for child in children.read_text().split())
    return total


def measure(url: str, script: str, duration: float, pid: int) -> tuple[Load, Load]:
    wrk(url, 4, 1.0, script)  # warm up connections and caches
    one = wrk(url, 1, duration, script)
    cpu_before = cpu_seconds(pid)
    many = wrk(url, 32, duration, script)
    many.cpu_us_per_request = (cpu_seconds(pid) - cpu_before) / many.requests * 1e6
    return one, many


def grow_rss(url: str, pid: int) -> tuple[float, float]:
    """RSS after 1k and after 10k requests: a leak shows as growth between the two."""
    rss = []
    with httpx.Client() as client:
        for count in (1_000, 9_000):
            for _ in range(count):
                client.post(url, content=BODY, headers={"content-type": "application/json"})
            rss.append(rss_mb(pid))
    return rss[0], rss[1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each measures every target once, in turn")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10k-request memory check")
    parser.add_argument("--workers", type=int, default=1,
                        help="also measure bpo serve --workers N")
    parser.add_argument("--servers", default="",
                        help="also measure the gateway (optimizer off) on these HTTP servers, comma-separated: "
                             + ", ".join(SERVERS) + " (bench/servers.py)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    python, servers = sys.executable, str(REPO / "bench/servers.py")
    ports = {name: free_port() for name in ("upstream", *TARGETS)}
    upstream = f"http://127.0.0.1:{ports['upstream']}/v1"
    commands = {
        "upstream": [python, servers, "upstream", "--port", str(ports["upstream"])],
        "reference (aiohttp)": [python, servers, "passthrough", "--port", str(ports["reference (aiohttp)"]),
                                "--upstream", upstream],
        "reference (httpx)": [python, servers, "passthrough-httpx", "--port", str(ports["reference (httpx)"]),
                              "--upstream", upstream],
    }
    for name, optimizer in (("bpo-proxy, optimizer off", "none"), ("bpo-proxy, cache hit", f"remote:{upstream}")):
        commands[name] = [python, "-m", "proxy", "serve", "--port", str(ports[name]), "--upstream-base-url",
                          upstream, "--optimizer", optimizer]
    if args.workers > 1:
        name = f"bpo-proxy, off, {args.workers} workers"
        ports[name] = free_port()
        commands[name] = [python, "-m", "proxy", "serve", "--port", str(ports[name]), "--upstream-base-url",
                          upstream, "--optimizer", "none", "--workers", str(args.workers)]
    for server in filter(None, args.servers.split(",")):
        name = f"bpo-proxy, off, on {server}"
        ports[name] = free_port()
        commands[name] = [python, servers, "gateway", "--server", server, "--port", str(ports[name]),
                          "--upstream", upstream]
    urls = {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        started = {}
        for name, command in commands.items():
            health = urls[name].replace("/v1/chat/completions", "/readyz" if "bpo" in name else "/")
            started[name] = stack.enter_context(process(command, health))
        check_proxies(urls)
        script = write_script(tmp)
        print(f"wrk: {args.rounds} rounds x {args.duration:g} s per run; 1 connection for latency, 32 for "
              f"throughput; medians over rounds", flush=True)
        runs: dict[str, list[tuple[Load, Load]]] = {name: [] for name in urls}
        for round_number in range(args.rounds):
            for name, url in urls.items():
                runs[name].append(measure(url, script, args.duration, started[name][0].pid))
            print(f"  round {round_number + 1} done", flush=True)
        report(runs)
        for name in ("bpo-proxy, optimizer off",):
            print(f"  {name}: ready (/readyz 200) {started[name][1]:.2f} s after spawn (target <= 2.0)")
            if not args.skip_rss:
                first, last = grow_rss(urls[name], started[name][0].pid)
                print(f"  {name}: RSS after 1k requests {first:.1f} MB, after 10k {last:.1f} MB "
                      f"({(last / first - 1) * 100:+.1f}%, target within 10%)")


TARGETS = ("reference (aiohttp)", "reference (httpx)", "bpo-proxy, optimizer off", "bpo-proxy, cache hit")


def check_proxies(urls: dict[str, str]) -> None:
    """The proxies must really be in the state measured: off passes through, cache hit hits."""
    off = httpx.post(urls["bpo-proxy, optimizer off"], content=BODY, headers={"content-type": "application/json"})
    assert off.headers["x-bpo-reason"] == "disabled", off.headers
    for _ in range(2):
        hit = httpx.post(urls["bpo-proxy, cache hit"], content=BODY, headers={"content-type": "application/json"})
    assert hit.headers["x-bpo-applied"] == "true" and hit.headers["x-bpo-cache"] == "hit", hit.headers


def report(runs: dict[str, list[tuple[Load, Load]]]) -> None:
    """Medians over rounds. The ratios to the reference are paired: each round's figure over the reference's
    in that same round (measured seconds apart), then the median of those, with their range."""
    med = {name: (median([one.p50_ms for one, _ in r]), median([one.p99_ms for one, _ in r]),
                  median([many.rps for _, many in r]), median([many.cpu_us_per_request for _, many in r]))
           for name, r in runs.items()}
    reference_runs = runs["reference (aiohttp)"]
    print(f"\n  {'target':<28}{'p50 ms':>9}{'p99 ms':>9}{'req/s @32':>11}{'CPU us/req':>12}{'added p50':>11}"
          f"{'added p99':>11}{'x ref req/s':>13}{'(range)':>12}{'x ref CPU':>11}")
    direct = med["upstream"]
    for name, (p50, p99, rps, cpu) in med.items():
        line = f"  {name:<28}{p50:9.3f}{p99:9.3f}{rps:11.0f}{cpu:12.0f}"
        if name != "upstream":
            rps_ratios = [many.rps / ref.rps for (_, many), (_, ref) in zip(runs[name], reference_runs, strict=True)]
            cpu_ratios = [many.cpu_us_per_request / ref.cpu_us_per_request
                          for (_, many), (_, ref) in zip(runs[name], reference_runs, strict=True)
                          if ref.cpu_us_per_request > 0] or [float("nan")]
            spread = f"{min(rps_ratios):.2f}-{max(rps_ratios):.2f}"
            line += f"{p50 - direct[0]:+11.3f}{p99 - direct[1]:+11.3f}"
            line += f"{median(rps_ratios):13.2f}{spread:>12}{median(cpu_ratios):11.2f}"
        print(line)
    print("\n  targets: bpo-proxy adds <= 1.0 ms p50 and <= 3 ms p99 over the upstream at 1 connection; "
          "throughput at 32 connections >= 0.8x the aiohttp reference")


if __name__ == "__main__":
    main()
