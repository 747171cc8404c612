"""Shared fixtures: the fake provider on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# litellm fetches its model cost map from the network at import unless told otherwise.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from tests.fakes.upstream import FakeUpstream

# The tiny random-weight Llama (tests/fakes/tiny_model.py), shared by optimizer and training tests.
pytest_plugins = ["tests.fakes.fixtures"]


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The session's fake provider, with its recordings and scripted answers reset for each test."""
    upstream_server.clear()
    yield upstream_server
    upstream_server.clear()
