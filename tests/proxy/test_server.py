"""The server's limits against hostile clients, on a real ``bpo serve`` process: header size, header and body
time, connection count, keep-alive. Bounds are small so the tests are quick; waits are generous (busy CI)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.proxy_server import ProxyProcess
from tests.fakes.upstream import FakeUpstream

PATIENCE = 20.0  # seconds: far past every bound below, so only a missing limit makes a test wait this long


def serve(upstream: FakeUpstream, *flags: str) -> ProxyProcess:
    return ProxyProcess(["--optimizer", "none", "--cache", "none", "--upstream-base-url", upstream.base_url,
                         "--log-level", "warning", *flags]).start()


@pytest.fixture(scope="module")
def gateway(upstream_server: FakeUpstream) -> Iterator[ProxyProcess]:
    # 2 s, not less: a client on a loaded machine may take a while between connecting and sending.
    proxy = serve(upstream_server, "--max-header-bytes", "8192", "--header-timeout", "2", "--body-timeout", "2",
                  "--keep-alive-timeout", "2", "--keep-alive-max-requests", "3")
    yield proxy
    proxy.stop()


def connect(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE)
    sock.settimeout(PATIENCE)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout here means it never did)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def error_of(reply: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def healthz_seconds(proxy: ProxyProcess) -> float:
    started = time.monotonic()
    assert httpx.get(proxy.url + "/healthz", timeout=PATIENCE).status_code == 200
    return time.monotonic() - started


def test_an_endless_header_is_refused_with_431_and_healthz_keeps_answering(gateway: ProxyProcess) -> None:
    sock = connect(gateway)

    def flood() -> None:  # up to 64 MB of one header, until the server stops reading
        chunk = b"a" * 65536
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
            for _ in range(1024):
                sock.sendall(chunk)
        except OSError:
            pass

    started = time.monotonic()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    health = [healthz_seconds(gateway) for _ in range(3)]
    reply = read_until_closed(sock)
    sender.join(PATIENCE)
    sock.close()
    status, error = error_of(reply)
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert time.monotonic() - started < PATIENCE - 5  # refused: not waiting for the header's end
    assert max(health) < 10.0


def test_a_complete_request_with_oversized_headers_gets_431(gateway: ProxyProcess) -> None:
    response = httpx.get(gateway.url + "/healthz", headers={"x-big": "a" * 20_000}, timeout=PATIENCE)
    assert response.status_code == 431
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(gateway.url + "/healthz", headers={"x-fits": "a" * 6_000}, timeout=PATIENCE).status_code == 200


def test_headers_never_finished_are_cut_after_the_header_timeout(gateway: ProxyProcess) -> None:
    sock = connect(gateway)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
    started = time.monotonic()
    closed = threading.Event()

    def trickle() -> None:  # slowloris: a header byte now and then, never the blank line
        try:
            while not closed.is_set() and time.monotonic() - started < PATIENCE:
                sock.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    reply = read_until_closed(sock)
    closed.set()
    sock.close()
    assert time.monotonic() - started < PATIENCE - 5
    status, error = error_of(reply)
    assert status == 408 and error["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(gateway: ProxyProcess) -> None:
    sock = connect(gateway)
    started = time.monotonic()
    assert read_until_closed(sock) == b""  # closed without an answer: no request to answer
    sock.close()
    assert time.monotonic() - started < PATIENCE - 5


def test_a_body_that_never_completes_is_cut_after_the_body_timeout(gateway: ProxyProcess) -> None:
    sock = connect(gateway)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 1000\r\n\r\n{\"model\": ")
    started = time.monotonic()
    reply = read_until_closed(sock)
    sock.close()
    assert time.monotonic() - started < PATIENCE - 5
    status, error = error_of(reply)
    assert status == 408 and "body" in error["message"]
    assert healthz_seconds(gateway) < 10.0


def test_keep_alive_connections_serve_a_bounded_number_of_requests(gateway: ProxyProcess) -> None:
    sock = connect(gateway)
    # Pipelined, so no idle gap lets the keep-alive timeout end the connection first on a slow machine.
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 4)
    replies = read_until_closed(sock).split(b"HTTP/1.1 ")[1:]
    sock.close()
    assert [reply[:3] for reply in replies] == [b"200", b"200", b"200"]  # the fourth is never answered
    assert [b"connection: close" in reply for reply in replies] == [False, False, True]


def test_an_idle_keep_alive_connection_is_closed(gateway: ProxyProcess) -> None:
    sock = connect(gateway)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    started = time.monotonic()
    reply = read_until_closed(sock)  # the answer, then the close once the connection idles
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" not in reply
    assert time.monotonic() - started < PATIENCE - 5


def test_past_the_connection_cap_a_client_gets_503_and_the_gateway_recovers(upstream: FakeUpstream) -> None:
    proxy = serve(upstream, "--max-connections", "20", "--header-timeout", "60")
    held = [connect(proxy) for _ in range(20)]
    try:
        _flood_past_the_cap(proxy, held)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + PATIENCE
        while httpx.get(proxy.url + "/healthz", timeout=PATIENCE).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not recover after the flood"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        proxy.stop()


def _flood_past_the_cap(proxy: ProxyProcess, held: list[socket.socket]) -> None:
    for sock in held:  # half-open requests: each holds its connection
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    refused = httpx.get(proxy.url + "/healthz", timeout=PATIENCE)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_connections"
    flood = [connect(proxy) for _ in range(200)]  # more past the cap: each answered and closed, none held
    replies = []
    for sock in flood:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        replies.append(read_until_closed(sock))
        sock.close()
    assert all(reply.startswith(b"HTTP/1.1 503") for reply in replies)
