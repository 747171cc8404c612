"""URLs as they may be shown (logs, /readyz, response headers, error messages): never with credentials."""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

from yarl import URL


def redact_url(url: str) -> str:
    """``url`` without its user, password, query and fragment: what a log line or a header may carry."""
    parts = urlsplit(url)
    if "@" in parts.path:  # a password holding "/" (unencoded) splits where no client library would
        return f"{parts.scheme}://[redacted]"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def without_credentials(url: URL) -> tuple[URL, str | None]:
    """``url`` without its user and password, and them as an ``Authorization: Basic`` value (or None)."""
    if url.raw_user is None and url.raw_password is None:
        return url, None
    token = base64.b64encode(f"{url.user or ''}:{url.password or ''}".encode()).decode()
    return url.with_user(None), f"Basic {token}"
