"""The ``/v1/*`` passthrough: a client's path never moves the request to another scheme, host or port."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from tests.fakes.upstream import FakeUpstream

from .conftest import StartProxy


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[FakeUpstream]:
    """A server the gateway must never be made to call: another host:port on loopback."""
    server = FakeUpstream().start()
    yield server
    server.stop()


def send_raw(port: int, method: str, target: str) -> tuple[int, bytes]:
    """The request line exactly as written: no client library normalises the path."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def base_urls(upstream: FakeUpstream) -> list[str]:
    """The configured upstream with and without a path: without one, the client's path is the whole path."""
    return [upstream.base_url, upstream.base_url.removesuffix("/v1")]


def hostile_paths(elsewhere: FakeUpstream) -> list[str]:
    other = f"127.0.0.1:{elsewhere.port}"
    return [
        f"/v1%2F@{other}/v1/models",            # the reported one: %2F then userinfo before another host
        f"/v1%2f@{other}/v1/models",
        f"/v1%40{other}/v1/models",             # no /v1/ route at all: 404
        f"/v1/..%2F..%2F@{other}/v1/models",
        "/v1/../v1/models",
        "/v1/files/../../admin",
        "/v1/files/%2e%2e/%2E%2E/admin",
        "/v1/files/.%2e/admin",
        "/v1/files/%2E/x",
        "/v1/files/..%2Fadmin",
        "/v1/files/..%5Cadmin",
        "/v1/files/%5C..%5C..%5Cadmin",
        "/v1/files/a\\..\\admin",
        "/v1/files/%zz",
        "/v1/..",
    ]


@pytest.mark.parametrize("base", [0, 1], ids=["base-with-path", "base-without-path"])
def test_hostile_paths_are_refused_and_never_leave_the_upstream(upstream: FakeUpstream, elsewhere: FakeUpstream,
                                                                start_proxy: StartProxy, base: int) -> None:
    proxy = start_proxy(upstream_base_url=base_urls(upstream)[base], optimizer="none")
    for path in hostile_paths(elsewhere):
        status, body = send_raw(proxy.port, "GET", path)
        assert status == (404 if path.startswith("/v1%40") else 400), (path, status, body)
        if status == 400 and body.startswith(b"{"):  # ours (a server may refuse a raw backslash before us)
            assert b'"invalid_request_error"' in body and b'"code":"invalid_path"' in body, (path, body)
    assert elsewhere.requests == []
    assert upstream.requests == []


@pytest.mark.parametrize("base", [0, 1], ids=["base-with-path", "base-without-path"])
def test_encoded_separators_inside_a_segment_stay_at_the_upstream(upstream: FakeUpstream, elsewhere: FakeUpstream,
                                                                   start_proxy: StartProxy, base: int) -> None:
    """``%2F``, ``%40`` and ``%5C`` inside a segment are names, sent on as the client encoded them."""
    configured = base_urls(upstream)[base]
    proxy = start_proxy(upstream_base_url=configured, optimizer="none")
    prefix = "/v1" if configured.endswith("/v1") else ""
    other = f"127.0.0.1:{elsewhere.port}"
    for path in ["/v1/files/a%2Fb/content", f"/v1/files/x%40{other}/content", "/v1/files/a%5Cb",
                 f"/v1/files/%2F%2F{other}/content", "/v1/files/a..b/.hidden"]:
        status, _ = send_raw(proxy.port, "GET", path + "?tag=x&tag=y")
        assert status == 200, path
        sent = upstream.requests[-1]
        assert (sent.raw_path, sent.query) == (prefix + path.removeprefix("/v1"), "tag=x&tag=y")
    assert elsewhere.requests == []
