"""The README's X-BPO-Reason list names every reason the gateway can send."""

from __future__ import annotations

import re
from pathlib import Path

from optimizer.reasons import REASONS
from proxy.skip import RULES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_reason() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("`X-BPO-Reason` when false (")
    listed = set(re.findall(r"`([a-z-]+)`", text[start:text.index("), `X-BPO-History-Replayed", start)]))
    assert set(REASONS) | {rule.name for rule in RULES} <= listed


def test_reasons_are_distinct_from_skip_rules() -> None:
    assert len(set(REASONS)) == len(REASONS)
    assert not set(REASONS) & {rule.name for rule in RULES}
