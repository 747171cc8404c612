"""The issue's hostile clients at full size against ``bpo serve`` with its default limits (proxy/server.py).

1. One endless header (up to 200 MB): how soon the 431 comes, how much the client sent meanwhile, the
   gateway's CPU time, and ``/healthz`` latency while it lasts.
2. A flood of half-open connections (request line sent, headers never finished): the gateway's open file
   descriptors at the peak, what a normal client gets during the flood (503 past ``--max-connections``), how
   long until the held connections are cut (``--header-timeout``), and ``/healthz`` after the flood.

    python bench/hostile_clients.py [--flood 10000] [--header-mb 200]

The load generator is this process; it raises its own open-file limit to the hard limit for the flood.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from proxy_overhead import cpu_seconds, process  # noqa: E402

from tests.fakes.upstream import free_port  # noqa: E402


def healthz_ms(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = httpx.get(url + "/healthz", timeout=60).status_code
    except httpx.TransportError:
        status = 0
    return status, (time.perf_counter() - started) * 1000


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def endless_header(url: str, port: int, pid: int, megabytes: int) -> None:
    quiet = [healthz_ms(url)[1] for _ in range(20)]
    print(f"/healthz before any attack: p50 {statistics.median(quiet):.1f} ms, max {max(quiet):.1f} ms")
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sent, done = 0, threading.Event()

    def send() -> None:
        nonlocal sent
        chunk = b"a" * 65536
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
            while sent < megabytes * 1024 * 1024 and not done.is_set():
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass

    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    threading.Thread(target=send, daemon=True).start()
    reply = sock.recv(65536)
    answered = time.perf_counter() - started
    health = [healthz_ms(url) for _ in range(20)]
    done.set()
    sock.close()
    print(f"endless header ({megabytes} MB offered): {reply.split(b' ', 2)[1].decode()} after "
          f"{answered * 1000:.0f} ms; client had sent {sent / 1e6:.1f} MB (lingering close drains it); gateway CPU "
          f"{cpu_seconds(pid) - cpu_before:.2f} s; /healthz meanwhile: all {sorted({s for s, _ in health})}, "
          f"p50 {statistics.median(ms for _, ms in health):.1f} ms, max {max(ms for _, ms in health):.1f} ms")


def flood(url: str, port: int, pid: int, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(count, hard - 200)
    socks, failed, started = [], 0, time.perf_counter()
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            sock.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
            socks.append(sock)
        except OSError:
            failed += 1
    opened = time.perf_counter() - started
    peak_files = open_files(pid)
    during = healthz_ms(url)
    print(f"flood: {len(socks)} half-open connections in {opened:.1f} s ({failed} refused by the kernel); "
          f"gateway open files {peak_files}; a normal client meanwhile: {during[0]} in {during[1]:.0f} ms")
    cut_after = None
    while time.perf_counter() - started < 60:
        alive = sum(1 for sock in socks if _still_open(sock))
        if alive == 0:
            cut_after = time.perf_counter() - started
            break
        time.sleep(0.5)
    after = healthz_ms(url)
    cut = "NOT within 60 s" if cut_after is None else f"{cut_after:.1f} s"
    print(f"  all flood connections closed by the gateway {cut} after the flood began; /healthz then: "
          f"{after[0]} in {after[1]:.0f} ms; gateway open files {open_files(pid)}")
    for sock in socks:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _still_open(sock: socket.socket) -> bool:
    try:
        while data := sock.recv(65536):
            del data
        return False  # orderly close, after any answer
    except BlockingIOError:
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=10_000, help="half-open connections to open")
    parser.add_argument("--header-mb", type=int, default=200, help="size of the endless header, in MB")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--optimizer", "none",
               "--upstream-base-url", "http://127.0.0.1:9/v1", "--log-level", "error"]
    with process(command, url + "/healthz") as (child, _):
        endless_header(url, port, child.pid, args.header_mb)
        flood(url, port, child.pid, args.flood)


if __name__ == "__main__":
    main()
