"""Servers the benchmarks start as processes: a lean fake upstream and the reference passthrough.

``python bench/servers.py upstream --port P`` answers every chat completion with a fixed small JSON body
(aiohttp.web, so the upstream itself is never the slowest part).
``python bench/servers.py passthrough --port P --upstream URL`` is the reference the issue measures against:
a ~30-line Starlette app that reads the body, POSTs it with one pooled aiohttp client and returns the bytes.
``python bench/servers.py gateway --server NAME --port P --upstream URL`` is bpo-proxy (optimizer off) on
another HTTP server than ``bpo serve``'s, to choose the server by measurement (``SERVERS``); granian and
hypercorn are not dependencies: ``pip install --target DIR granian hypercorn`` and set BENCH_EXTRA_PATH=DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator

CHAT_RESPONSE = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}}).encode()

COMPLETION_RESPONSE = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": "bpo-bench",
    "choices": [{"index": 0, "text": " Say hello, in one friendly sentence, to the reader of this benchmark.",
                 "finish_reason": "stop"}]}).encode()


def run_upstream(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=CHAT_RESPONSE, content_type="application/json")

    async def completion(request: web.Request) -> web.Response:  # the optimizer, for cache-hit runs
        await request.read()
        return web.Response(body=COMPLETION_RESPONSE, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bpo-bench", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completion)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_passthrough(port: int, upstream: str) -> None:
    import aiohttp
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    session: dict[str, aiohttp.ClientSession] = {}

    async def chat(request: Request) -> Response:
        body = await request.body()
        async with session["client"].post(upstream + "/chat/completions", data=body,
                                          headers={"content-type": "application/json"}) as answer:
            payload = await answer.read()
            return Response(payload, status_code=answer.status, media_type=answer.content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await session["client"].close()

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_passthrough_httpx(port: int, upstream: str) -> None:
    """The same reference with one pooled httpx.AsyncClient: the fast path's HTTP client was chosen on this."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    clients: dict[str, httpx.AsyncClient] = {}

    async def chat(request: Request) -> Response:
        answer = await clients["client"].post(upstream + "/chat/completions", content=await request.body(),
                                              headers={"content-type": "application/json"})
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients["client"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                                  max_keepalive_connections=100))
        yield
        await clients["client"].aclose()

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


SERVERS = ("uvicorn-httptools", "uvicorn-h11", "granian", "hypercorn")


def run_gateway(port: int, upstream: str, server: str) -> None:
    """bpo-proxy, optimizer off, on ``server`` with that server's own limits only (none of proxy/server.py)."""
    sys.path[:0] = [p for p in os.environ.get("BENCH_EXTRA_PATH", "").split(os.pathsep) if p]
    os.environ.update({"BPO_UPSTREAM_BASE_URL": upstream, "BPO_OPTIMIZER": "none", "BPO_LOG_LEVEL": "warning"})
    factory = "proxy.app:create_app_from_environment"
    if server == "granian":  # its own process tree; Rust HTTP/1 with a header-read timeout and buffer bound
        os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
        os.execv(sys.executable, [sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--host",
                                  "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--log-level", "warning",
                                  "--no-ws", factory])
    from proxy.app import create_app_from_environment

    app = create_app_from_environment()
    if server == "hypercorn":
        import uvloop
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind, config.loglevel, config.read_timeout = [f"127.0.0.1:{port}"], "warning", 10
        uvloop.run(serve(app, config))  # type: ignore[arg-type]
        return
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, server_header=False,
                http=server.removeprefix("uvicorn-"))


ROLES = {"passthrough": run_passthrough, "passthrough-httpx": run_passthrough_httpx}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("upstream", "gateway", *ROLES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn-httptools", help="for the gateway role")
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port)
    elif args.role == "gateway":
        run_gateway(args.port, args.upstream, args.server)
    else:
        ROLES[args.role](args.port, args.upstream)
