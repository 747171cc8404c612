"""Fixtures for the optimizer tests: the shared Redis (per-test namespace), a private redis-server, a model dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model directory: config, tokenizer, weights, and a file that is not part of the model."""
    directory = tmp_path / "bpo-model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (directory / "README.md").write_text("notes")
    return directory
