"""What proxy/server.py's limits cost per request: the guarded protocol against uvicorn's own, in one process.

Both protocols serve the same keep-alive requests (the chat completion wrk sends, in one read each) from a
fake transport to a trivial ASGI app, alternating in rounds, so machine noise hits both alike; the
figure is the CPU time per request of each and their paired difference. No sockets, no gateway: only the
HTTP layer, the part the guards touch.

    python bench/server_guards.py [--requests 20000] [--rounds 15]

For instructions instead of time: ``valgrind --tool=callgrind python bench/server_guards.py --only guarded
--requests N`` for two values of N (and ``--only plain``); the difference over the difference in N.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.server import ServerLimits, protocol_factory, uvicorn_options  # noqa: E402
from proxy.settings import load_settings  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from proxy_overhead import BODY  # noqa: E402

REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY.encode()))
ANSWER = b'{"ok": true}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"12")]})
    await send({"type": "http.response.body", "body": ANSWER})


class Transport(asyncio.Transport):
    """Counts answers; everything else a socket transport does is a no-op here."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data).endswith(ANSWER):
            self.answers += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def serve(factory: Any, config: uvicorn.Config, requests: int) -> float:
    """CPU seconds per request for ``requests`` keep-alive requests on one connection."""
    transport = Transport()
    protocol = factory(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(transport)
    started = time.process_time()
    for _ in range(requests):
        expected = transport.answers + 1
        protocol.data_received(REQUEST)
        while transport.answers < expected:
            await asyncio.sleep(0)
    spent = time.process_time() - started
    protocol.connection_lost(None)
    return spent / requests


def setup() -> tuple[dict[str, Any], uvicorn.Config]:
    settings = load_settings({"keep_alive_max_requests": 10**9}, environ={})
    factories = {"uvicorn httptools": HttpToolsProtocol,
                 "guarded (proxy/server.py)": protocol_factory(ServerLimits.from_settings(settings))}
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            **{**uvicorn_options(settings), "http": "httptools"})
    config.load()
    return factories, config


async def serve_only(which: str, requests: int) -> None:
    factories, config = setup()
    await serve(factories["uvicorn httptools" if which == "plain" else "guarded (proxy/server.py)"], config,
                requests)


async def measure(requests: int, rounds: int) -> None:
    factories, config = setup()
    results: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(rounds):
        for name, factory in factories.items():
            results[name].append(await serve(factory, config, requests))
    plain, guarded = results["uvicorn httptools"], results["guarded (proxy/server.py)"]
    for name, values in results.items():
        print(f"  {name:<28}{statistics.median(values) * 1e6:8.2f} us/request (median of {rounds} rounds)")
    extra = [(g - p) * 1e6 for g, p in zip(guarded, plain, strict=True)]
    print(f"  guards add {statistics.median(extra):+.2f} us/request (paired rounds: {min(extra):+.2f} to "
          f"{max(extra):+.2f}), {statistics.median(g / p for g, p in zip(guarded, plain, strict=True)):.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per protocol per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", choices=("plain", "guarded"),
                        help="serve with one protocol only, once (to count instructions under valgrind)")
    args = parser.parse_args()
    uvloop.run(measure(args.requests, args.rounds) if args.only is None else serve_only(args.only, args.requests))


if __name__ == "__main__":
    main()
