"""URLs as they may be shown (logs, /readyz, response headers, error messages): never with credentials."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """``url`` without its user, password, query and fragment: what a log line or a header may carry."""
    parts = urlsplit(url)
    if "@" in parts.path:  # a password holding "/" (unencoded) splits where no client library would
        return f"{parts.scheme}://[redacted]"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
