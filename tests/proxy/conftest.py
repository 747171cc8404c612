"""Proxy fixtures: the real gateway on loopback in front of the fake provider."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.fakes.proxy_server import RunningProxy, make_settings
from tests.fakes.upstream import FakeUpstream

StartProxy = Callable[..., RunningProxy]


@pytest.fixture
def start_proxy(upstream: FakeUpstream) -> Iterator[StartProxy]:
    """Start a gateway with the given settings; by default upstream and optimizer are the fake provider."""
    running: list[RunningProxy] = []

    def start(**values: Any) -> RunningProxy:
        values.setdefault("upstream_base_url", upstream.base_url)
        values.setdefault("optimizer", f"remote:{upstream.base_url}")
        proxy = RunningProxy(make_settings(**values)).start()
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: StartProxy) -> RunningProxy:
    return start_proxy()


@pytest.fixture
def client(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
