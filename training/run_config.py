"""What every training stage saves next to its artifacts: its config, with secrets redacted."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

REDACTED = "<redacted>"
# Names of values never written to disk: ``*api_key`` and any name with a word ``token``/``secret``/
# ``password`` (``secrets`` too). Whole words only, so counts like ``max_tokens`` are kept.
_SECRET_NAME = re.compile(r"(api_?key$)|(^|[_\-])(token|secrets?|password)([_\-]|$)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_secrets(value: Any) -> Any:
    """``value`` with every secret-named field (at any depth) replaced by ``<redacted>``; unset stays None."""
    if isinstance(value, dict):
        return {key: (REDACTED if is_secret_name(str(key)) and item is not None else redact_secrets(item))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    return value


def saved_config(config: Any) -> dict[str, Any]:
    """A stage's dataclass config as every stage saves it next to its artifacts: API keys redacted."""
    redacted: dict[str, Any] = redact_secrets(asdict(config))
    return redacted
