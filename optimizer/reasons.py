"""The values of ``X-BPO-Reason``: why a request went upstream without a rewrite.

One home for the vocabulary, so the pipeline, the A/B split and the serving path cannot drift apart. The skip
policy's rule names are reasons too: their names are here (``SKIP_RULE_NAMES``, which settings and client keys
validate against), their rules in ``proxy/skip.py``.
"""

from __future__ import annotations

from typing import Final

# Decided before the optimizer is asked (the proxy: A/B split, --optimizer none, request shape).
DISABLED: Final = "disabled"
CONTROL_ARM: Final = "control-arm"
NOT_USER_TURN: Final = "not-user-turn"
# Decided by the rewrite pipeline.
TOO_LONG: Final = "too-long"
TIMEOUT: Final = "timeout"
OPTIMIZER_ERROR: Final = "optimizer-error"
OPTIMIZER_UNAVAILABLE: Final = "optimizer-unavailable"
GUARD_REJECTED: Final = "guard-rejected"
UNCHANGED: Final = "unchanged"
# The rewrite stopped on its token budget, not by itself: its end (often the question) may be missing.
TRUNCATED: Final = "truncated"
# The optimizer's queue could not have finished within the deadline: sent on at once, not after it.
BUSY: Final = "busy"

# The skip policy's rules (proxy/skip.py): each rule's name is the reason it gives.
SKIP_RULE_NAMES: Final = ("json-schema", "code-or-data", "unsupported-language")

REASONS: Final = (DISABLED, CONTROL_ARM, NOT_USER_TURN, TOO_LONG, TIMEOUT, OPTIMIZER_ERROR,
                  OPTIMIZER_UNAVAILABLE, GUARD_REJECTED, UNCHANGED, TRUNCATED, BUSY)
