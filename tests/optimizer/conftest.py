"""Fixtures for the optimizer tests: the shared Redis (per-test namespace) and a private redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.fakes.fixtures import SHARED_REDIS_URL
from tests.optimizer.cache_helpers import RedisServer


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
