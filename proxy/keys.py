"""Client keys: what a virtual key allows, how it is made, hashed and checked."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from optimizer.reasons import SKIP_RULE_NAMES

Optimize = Literal["on", "off", "default"]
OPTIMIZE_POLICIES: tuple[Optimize, ...] = ("on", "off", "default")
KEY_PREFIX = "sk-bpo-"
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Budget periods a key may reset on; None: the budget is for the key's whole life.
PERIODS = {"1h": 3600, "1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}


class KeySpecError(ValueError):
    """A key definition (admin API body or config ``keys:`` entry) is malformed; the message names the field."""


@dataclass(frozen=True)
class ClientKey:
    """One virtual client key, as stored: its hash (never the key), its limits and its policy."""

    id: str
    name: str
    key_hash: str  # hex SHA-256 of the key
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_budget_usd: float | None = None
    budget_period: str | None = None  # one of PERIODS, or None
    optimize: Optimize = "default"
    skip_rules: tuple[str, ...] | None = None  # the skip policy's rules for this key; None: the route's
    source: Literal["api", "config"] = "api"
    created: float = field(default_factory=time.time)
    # Whether admitting a request needs the store (a rate limit or a budget to check). A field, not a
    # property: it is read on every request.
    limited: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limited",
                           self.rpm is not None or self.tpm is not None or self.max_budget_usd is not None)

    @property
    def period_seconds(self) -> int:
        return PERIODS[self.budget_period] if self.budget_period else 0

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        return {"id": self.id, "name": self.name, "models": list(self.models) if self.models is not None else None,
                "rpm": self.rpm, "tpm": self.tpm, "max_budget_usd": self.max_budget_usd,
                "budget_period": self.budget_period, "optimize": self.optimize,
                "skip_rules": list(self.skip_rules) if self.skip_rules is not None else None,
                "source": self.source, "created": self.created}

    def limits_json(self) -> dict[str, Any]:
        """The definition as stored beside the hash (the store's ``spec`` column or field)."""
        return {k: v for k, v in self.public().items() if k not in ("id", "name", "source", "created")}


def new_key() -> str:
    """A fresh client key: 256 random bits, prefixed so it is recognisable in a leak scanner."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two key hashes (hex digests: ASCII, which ``compare_digest`` takes as str)."""
    return hmac.compare_digest(a, b)


def new_id() -> str:
    return "key_" + secrets.token_hex(8)


def key_from_spec(spec: Mapping[str, Any], *, key_hash: str, id: str, source: Literal["api", "config"],
                  where: str) -> ClientKey:
    """A ``ClientKey`` from a JSON/YAML definition; raises ``KeySpecError`` naming the bad field."""
    allowed = {"name", "models", "rpm", "tpm", "max_budget_usd", "budget_period", "optimize", "skip_rules", "key",
               "key_hash"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise KeySpecError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise KeySpecError(f"{where}.name: 1-64 characters of letters, digits and ._:@- are required")
    return ClientKey(id=id, name=name, key_hash=key_hash, models=_models(spec.get("models"), where),
                     rpm=_positive_int(spec.get("rpm"), f"{where}.rpm"),
                     tpm=_positive_int(spec.get("tpm"), f"{where}.tpm"),
                     max_budget_usd=_budget(spec.get("max_budget_usd"), where),
                     budget_period=_period(spec.get("budget_period"), where),
                     optimize=_optimize(spec.get("optimize"), where),
                     skip_rules=_skip_rules(spec.get("skip_rules"), where), source=source)


def config_key(spec: Any, index: int) -> ClientKey:
    """One ``keys:`` entry of the config YAML: ``key`` (the key itself) or ``key_hash`` (``sha256:HEX``)."""
    where = f"keys[{index}]"
    if not isinstance(spec, Mapping):
        raise KeySpecError(f"{where}: must be a mapping with name and key (or key_hash)")
    key, digest = spec.get("key"), spec.get("key_hash")
    if (key is None) == (digest is None):
        raise KeySpecError(f"{where}: give exactly one of key and key_hash")
    if key is not None:
        if not isinstance(key, str) or len(key) < 16:
            raise KeySpecError(f"{where}.key: must be a string of at least 16 characters")
        key_hash = hash_key(key)
    else:
        text = str(digest).lower().removeprefix(HASH_PREFIX)
        if not _HEX_DIGEST.match(text):
            raise KeySpecError(f"{where}.key_hash: must be sha256:<64 hex digits> (sha256 of the key)")
        key_hash = text
    name = spec.get("name")
    return key_from_spec(spec, key_hash=key_hash, id=f"cfg_{name}", source="config", where=where)


def with_policy(key: ClientKey, optimize: Optimize) -> ClientKey:
    return replace(key, optimize=optimize)


def _models(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise KeySpecError(f"{where}.models: must be a list of model names")
    return tuple(value)


def _positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeySpecError(f"{where}: must be a positive integer")
    return value


def _budget(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise KeySpecError(f"{where}.max_budget_usd: must be a number >= 0")
    return float(value)


def _period(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in PERIODS:
        raise KeySpecError(f"{where}.budget_period: must be one of {', '.join(PERIODS)}")
    return str(value)


def _skip_rules(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) and name in SKIP_RULE_NAMES for name in value):
        raise KeySpecError(f"{where}.skip_rules: a list of rule names among {', '.join(SKIP_RULE_NAMES)} ([]: none)")
    return tuple(dict.fromkeys(value))


def _optimize(value: Any, where: str) -> Optimize:
    if value is None:
        return "default"
    if value not in OPTIMIZE_POLICIES:
        raise KeySpecError(f"{where}.optimize: must be on, off or default")
    policy: Optimize = value
    return policy
