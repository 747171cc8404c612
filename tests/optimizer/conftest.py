"""Fixtures for the optimizer tests: the shared Redis (per-test namespace) and a private redis-server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.optimizer.cache_helpers import RedisServer

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace on the shared Redis that no other test uses; its keys are deleted afterwards."""
    name = f"bpo-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    """A client of the Redis at 127.0.0.1:6379; a missing Redis fails the test, it does not skip."""
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server this test may kill, pause and restart."""
    server = RedisServer().start()
    yield server
    server.kill()
