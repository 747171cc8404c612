"""URLs as shown: the credentials never, wherever they sit."""

from __future__ import annotations

import base64

import pytest
from yarl import URL

from optimizer.urls import redact_url, without_credentials


@pytest.mark.parametrize(("url", "shown"), [
    ("rediss://:pw@host/0", "rediss://host/0"),
    ("http://user:pw@vllm:8000/v1", "http://vllm:8000/v1"),
    ("http://user@vllm:8000/v1?key=pw#frag", "http://vllm:8000/v1"),
    ("http://vllm:8000/v1", "http://vllm:8000/v1"),
    ("http://user:p/w@vllm:8000/v1", "http://[redacted]"),
])
def test_credentials_never_show(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credentials_become_a_basic_authorization_value() -> None:
    url, auth = without_credentials(URL("http://bpo:p%40ss@vllm:8000/v1"))
    assert (str(url), auth) == ("http://vllm:8000/v1", "Basic " + base64.b64encode(b"bpo:p@ss").decode())
    assert without_credentials(URL("http://vllm:8000/v1")) == (URL("http://vllm:8000/v1"), None)
