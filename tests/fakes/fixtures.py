"""Pytest fixtures built from the fakes; ``tests/conftest.py`` imports them so every test folder can use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama + trained tokenizer on disk, built once per test session.

    Treat it as read-only: tests that write into a model dir (a manifest, a fine-tune) copy it first.
    """
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
