"""A/B arm assignment: a sticky, monotone hash split between treatment (optimize) and control."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from optimizer.base import MODES, Mode
from optimizer.reasons import CONTROL_ARM, DISABLED
from proxy.errors import InvalidRequest
from proxy.settings import Settings

Arm = Literal["treatment", "control"]
NotOptimizedReason = Literal["disabled", "control-arm"]  # optimizer.reasons.DISABLED, CONTROL_ARM

OVERRIDE_HEADER = "x-bpo"
USER_HEADER = "x-bpo-user"
OVERRIDE_VALUES = ("on", "off", *MODES)

# 2**64 buckets: fine enough that any percent a person types (even 0.001) lands on a real boundary.
_BUCKETS = float(2**64)


class InvalidOverride(InvalidRequest, ValueError):
    """``X-BPO`` carries a value other than on, off, stable or aggressive: a 400 in OpenAI's shape."""

    code = "invalid_x_bpo"


@dataclass(frozen=True)
class ArmDecision:
    """What the A/B layer decided for one request."""

    arm: Arm | None  # None when no split is configured
    optimize: bool  # rewrite this request?
    mode: Mode
    override: bool  # X-BPO decided; kept out of the arm statistics
    reason: NotOptimizedReason | None  # why not optimized, when optimize is False

    @property
    def stats_arm(self) -> str:
        """The ``arm`` label for metrics: overrides and unsplit traffic get their own label."""
        if self.arm is None:
            return "none"
        return "override" if self.override else self.arm


def bucket(salt: str, sticky_key: str) -> float:
    """Where a key falls in [0, 100); treatment is ``bucket < percent``, so ramps only add users."""
    # surrogatepass: a client's ``user`` may hold a lone surrogate escape; other keys encode as plain UTF-8.
    digest = hashlib.sha256(f"{salt}\x00{sticky_key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / _BUCKETS * 100.0


def arm_for(salt: str, sticky_key: str, treatment_percent: float) -> Arm:
    return "treatment" if bucket(salt, sticky_key) < treatment_percent else "control"


def sticky_key(body: Mapping[str, Any], headers: Mapping[str, str], api_key: str | None) -> str:
    """The body's ``user``, else ``X-BPO-User``, else a hash of the API key, else a fresh random key."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    header_user = headers.get(USER_HEADER, "").strip()
    if header_user:
        return "user:" + header_user
    if api_key:
        # Hashed so the key itself never sits in memory longer than the request, nor in any log.
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()
    return "random:" + uuid.uuid4().hex


def parse_override(value: str | None) -> str | None:
    """The normalized ``X-BPO`` value, or None when the header is absent or blank."""
    if value is None or not value.strip():
        return None
    normalized = value.strip().lower()
    if normalized not in OVERRIDE_VALUES:
        allowed = ", ".join(OVERRIDE_VALUES)
        raise InvalidOverride(f"X-BPO must be one of {allowed}; got {value.strip()!r}", param="X-BPO")
    return normalized


class ArmAssigner:
    """Decides arm, optimize and mode for each request from X-BPO, the split and the defaults."""

    def __init__(self, settings: Settings) -> None:
        self.percent = settings.ab_treatment_percent
        self.salt = settings.ab_salt
        self.experiment = settings.ab_experiment
        self.default_mode: Mode = "aggressive" if settings.mode == "aggressive" else "stable"
        self.optimize_by_default = settings.optimize_by_default
        # Without a split every request gets one of two decisions: built once, not per request.
        self._unsplit_decision = (
            ArmDecision(None, True, self.default_mode, override=False, reason=None) if self.optimize_by_default
            else ArmDecision(None, False, self.default_mode, override=False, reason=DISABLED))

    @property
    def split_configured(self) -> bool:
        return self.percent is not None

    def decide(self, body: Mapping[str, Any], headers: Mapping[str, str], api_key: str | None,
               policy: str = "default") -> ArmDecision:
        """``headers`` have lower-case names. Raises ``InvalidOverride`` for a bad X-BPO value.

        ``policy`` is the client key's ``optimize``: ``on`` / ``off`` decide before X-BPO and the split (the
        request is then an override, kept out of the arm statistics); X-BPO may still pick the mode.
        """
        override = parse_override(headers.get(OVERRIDE_HEADER))
        if policy != "default":
            return self._overridden(policy if policy == "off" or override not in MODES else override)
        if override is not None:
            return self._overridden(override)
        if self.percent is None:
            return self._unsplit_decision
        arm = arm_for(self.salt, sticky_key(body, headers, api_key), self.percent)
        if arm == "treatment":
            return ArmDecision("treatment", True, self.default_mode, override=False, reason=None)
        return ArmDecision("control", False, self.default_mode, override=False, reason=CONTROL_ARM)

    def _overridden(self, override: str) -> ArmDecision:
        optimize = override != "off"
        mode: Mode = override if override in MODES else self.default_mode  # type: ignore[assignment]
        # With a split configured the response still names an arm: the one whose behaviour it got.
        arm: Arm | None = None if self.percent is None else ("treatment" if optimize else "control")
        return ArmDecision(arm, optimize, mode, override=True, reason=None if optimize else DISABLED)
