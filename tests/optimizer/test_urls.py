"""URLs as shown: the credentials never, wherever they sit."""

from __future__ import annotations

import pytest

from optimizer.urls import redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("rediss://:pw@host/0", "rediss://host/0"),
    ("http://user:pw@vllm:8000/v1", "http://vllm:8000/v1"),
    ("http://user@vllm:8000/v1?key=pw#frag", "http://vllm:8000/v1"),
    ("http://vllm:8000/v1", "http://vllm:8000/v1"),
    ("http://user:p/w@vllm:8000/v1", "http://[redacted]"),
])
def test_credentials_never_show(url: str, shown: str) -> None:
    assert redact_url(url) == shown
