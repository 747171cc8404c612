"""A fake provider: records every request, answers plain/SSE/errors/delays on cue.

It speaks OpenAI's chat completions, completions (the optimizer) and Responses API, and Anthropic's Messages
API (``/v1/messages``), each answering ``echo: <the newest user text>``.

Run in-process (``FakeUpstream().start()``, a uvicorn server on a thread) or as a process:
``python -m tests.fakes.upstream --port 9001`` (benchmarks do this to keep its CPU apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TEMPLATE_HEAD = "Please help me improve this prompt to get a more helpful and harmless response:\n"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw_path: str = ""
    query: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What the fake answers: JSON, an SSE stream of chunks, or raw bytes; optional delay and headers.

    Broken providers: ``cut_after`` drops the connection after that many ``sse`` chunks (no final chunk);
    ``stall_after`` goes silent for ``stall_seconds`` after that many. ``media_type`` sends the chunks as
    something else than SSE (a plain JSON answer trickled in pieces).
    """

    status: int = 200
    json: Any = None
    sse: list[bytes] | None = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_delay: float = 0.0
    media_type: str = "text/event-stream"
    cut_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0


Responder = Callable[[Recorded], Reply]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return ""


def chat_reply(body: dict[str, Any], content: str | None = None) -> Reply:
    """An OpenAI chat completion answering ``echo: <last user text>`` (or ``content``)."""
    text = content if content is not None else "echo: " + last_user_text(body)
    model = body.get("model", "fake-model")
    n = int(body.get("n") or 1)
    usage = {"prompt_tokens": 11, "completion_tokens": len(text.split()), "total_tokens": 11 + len(text.split())}
    if body.get("stream"):
        return Reply(sse=sse_chunks(model, text, n, include_usage=bool(
            (body.get("stream_options") or {}).get("include_usage")), usage=usage))
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                "logprobs": None} for i in range(n)]
    return Reply(json={"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000,
                       "model": model, "choices": choices, "usage": usage})


def sse_chunks(model: str, text: str, n: int = 1, include_usage: bool = False,
               usage: dict[str, int] | None = None) -> list[bytes]:
    def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
        payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                   "model": model, "choices": choices, **(extra or {})}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    out = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                  for i in range(n)])]
    for word in text.split(" "):
        out += [chunk([{"index": i, "delta": {"content": word + " "}, "finish_reason": None}]) for i in range(n)]
    out.append(chunk([{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n)]))
    if include_usage:
        out.append(chunk([], {"usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


def _texts(content: Any, text_types: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") in text_types)


def newest_input_text(body: dict[str, Any]) -> str:
    """The Responses API's newest user text: ``input`` as a string, or its last user item's text parts."""
    given = body.get("input")
    if isinstance(given, str):
        return given
    users = [item for item in given or [] if isinstance(item, dict) and item.get("role") == "user"]
    return _texts(users[-1].get("content"), ("input_text",)) if users else ""


def responses_reply(body: dict[str, Any], content: str | None = None) -> Reply:
    """A Responses API answer (plain or SSE) echoing the newest user text."""
    text = content if content is not None else "echo: " + newest_input_text(body)
    model = body.get("model", "fake-model")
    message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {"input_tokens": 11, "output_tokens": len(text.split()), "total_tokens": 11 + len(text.split()),
             "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    done = {"id": "resp_fake", "object": "response", "created_at": 1700000000, "status": "completed",
            "model": model, "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage}
    if not body.get("stream"):
        return Reply(json=done)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": {**message, "status": "in_progress",
                                                                   "content": []}}),
        ("response.content_part.added", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                         "part": {"type": "output_text", "text": "", "annotations": []}}),
    ]
    events += [("response.output_text.delta", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                               "delta": word + " "}) for word in text.split(" ")]
    events += [("response.output_text.done", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                              "text": text}),
               ("response.output_item.done", {"output_index": 0, "item": message}),
               ("response.completed", {"response": done})]
    return Reply(sse=[named_event(name, {"type": name, "sequence_number": number, **data})
                      for number, (name, data) in enumerate(events)])


def named_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"


def last_user_blocks_text(body: dict[str, Any]) -> str:
    """The Messages API's last user turn's text blocks."""
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return _texts(users[-1].get("content"), ("text",)) if users else ""


def messages_reply(body: dict[str, Any], content: str | None = None) -> Reply:
    """An Anthropic Messages API answer (plain or SSE) echoing the last user turn's text."""
    text = content if content is not None else "echo: " + last_user_blocks_text(body)
    model = body.get("model", "claude-fake")
    usage = {"input_tokens": 11, "output_tokens": len(text.split())}
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": usage}
    if not body.get("stream"):
        return Reply(json=message)
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                       "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
    ]
    events += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word + " "}})
               for word in text.split(" ")]
    events += [("content_block_stop", {"index": 0}),
               ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": len(text.split())}}),
               ("message_stop", {})]
    return Reply(sse=[named_event(name, {"type": name, **data}) for name, data in events])


def default_rewrite(prompt: str) -> str:
    """What the fake optimizer writes: the prompt kept whole, with a helpful framing around it."""
    return f"{prompt.strip()} Please answer in detail, step by step, and explain your reasoning."


def completion_reply(body: dict[str, Any], rewrite: Callable[[str], str] = default_rewrite) -> Reply:
    prompt = str(body.get("prompt", ""))
    inner = prompt.split(TEMPLATE_HEAD, 1)[-1].rsplit(" [/INST]", 1)[0]
    text = " " + rewrite(inner)
    if body.get("stream"):
        return Reply(sse=[_completion_chunk(body, piece + " ") for piece in text.split(" ")]
                     + [_completion_chunk(body, "", "stop"), b"data: [DONE]\n\n"])
    return Reply(json={"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                       "model": body.get("model", "bpo-fake"),
                       "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                       "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}})


def _completion_chunk(body: dict[str, Any], text: str, finish: str | None = None) -> bytes:
    payload = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
               "model": body.get("model", "bpo-fake"),
               "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class CutStream(Response):
    """The first ``cut_after`` chunks of ``reply.sse``, then the connection dropped: no final chunk."""

    def __init__(self, reply: Reply) -> None:
        self.status_code = reply.status
        headers = {"content-type": reply.media_type, **reply.headers}  # no length: the body goes chunked
        self.raw_headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        self.chunks = (reply.sse or [])[:reply.cut_after]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # Returning with the body incomplete: uvicorn closes the connection without the last chunk.


class FakeUpstream:
    """The fake provider. ``responders[path]`` overrides the default answer for a path."""

    def __init__(self, port: int | None = None, models: tuple[str, ...] = ("fake-model", "bpo-fake")) -> None:
        self.port = port or free_port()
        self.models = models
        self.requests: list[Recorded] = []
        self.responders: dict[str, Responder] = {}
        self.disconnects = 0
        self.abandoned = 0  # requests whose client left while a ``delay`` ran
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.abandoned = 0
        self.responders.clear()

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE", "PUT"])])

    async def _handle(self, request: Request) -> Response:
        recorded = Recorded(request.method, request.url.path, dict(request.headers), await request.body(),
                            request.scope.get("raw_path", b"").decode("latin-1"),
                            request.scope.get("query_string", b"").decode("latin-1"))
        with self._lock:
            self.requests.append(recorded)
        reply = self._reply_for(recorded)
        if reply.delay and await self._client_left(request, reply.delay):
            return Response(status_code=499)
        if reply.sse is not None and reply.cut_after is not None:
            return CutStream(reply)
        if reply.sse is not None:
            return StreamingResponse(self._stream(reply), status_code=reply.status,
                                     media_type=reply.media_type, headers=reply.headers)
        if reply.raw is not None:
            return Response(reply.raw, status_code=reply.status, headers=reply.headers)
        try:
            return JSONResponse(reply.json, status_code=reply.status, headers=reply.headers)
        except UnicodeEncodeError:  # echoing a lone surrogate escape a client sent: keep it escaped, as a provider does
            return Response(json.dumps(reply.json, separators=(",", ":")), status_code=reply.status,
                            headers=reply.headers, media_type="application/json")

    async def _client_left(self, request: Request, seconds: float) -> bool:
        """Waits ``seconds``, or less when the client closes its connection: then True, counted in ``abandoned``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(request.receive(), left)
            except TimeoutError:
                return False
            if message["type"] == "http.disconnect":
                with self._lock:
                    self.abandoned += 1
                return True
        return False

    async def _stream(self, reply: Reply) -> Any:
        try:
            for sent, chunk in enumerate(reply.sse or [], start=1):
                yield chunk
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                if sent == reply.stall_after:
                    await asyncio.sleep(reply.stall_seconds)
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnects += 1
            raise

    def _reply_for(self, recorded: Recorded) -> Reply:
        if recorded.path in self.responders:
            return self.responders[recorded.path](recorded)
        if recorded.path == "/v1/chat/completions":
            return chat_reply(recorded.json)
        if recorded.path == "/v1/completions":
            return completion_reply(recorded.json)
        if recorded.path == "/v1/responses":
            return responses_reply(recorded.json)
        if recorded.path == "/v1/messages":
            return messages_reply(recorded.json)
        if recorded.path == "/v1/messages/count_tokens":
            return Reply(json={"input_tokens": 42})
        if recorded.path == "/v1/models":
            return Reply(json={"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]})
        return Reply(json={"object": "echo", "path": recorded.path, "method": recorded.method})

    def start(self) -> FakeUpstream:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible upstream.")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    upstream = FakeUpstream(port=args.port)
    uvicorn.run(upstream.app(), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off",
                access_log=False)


if __name__ == "__main__":
    main()
