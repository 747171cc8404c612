"""``bpo_manifest.json``: what a trained optimizer dir says about itself (name, version, provenance).

The format lives with its reader: the ``hf:`` backend reads it (``read_manifest``, via optimizer/identity.py)
to name the optimizer ``name@version`` in ``X-BPO-Optimizer`` and in cache keys, so a retrained model never
serves stale rewrites; ``bpo train`` writes it (``build_manifest`` + ``write_manifest``).

The version is read as written, never recomputed: a manifest written before the model fingerprint became
the one hash of a model version (its version then hashed every weight byte) keeps its version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from optimizer.fingerprint import fingerprint_model_dir
from optimizer.template import TEMPLATE_VERSION

MANIFEST_NAME = "bpo_manifest.json"
VERSION_LENGTH = 12


class ManifestError(ValueError):
    """A manifest file exists but is not a valid manifest."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    base_model: str
    data_sha256: str
    template_version: str
    created: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """``name@version``, as the proxy reports the optimizer."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_REQUIRED = ("name", "version", "base_model", "data_sha256", "template_version", "created")


def read_manifest(model_dir: str | Path) -> Manifest | None:
    """The manifest of ``model_dir``; None when it has none (e.g. a hub model not trained by us)."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(payload, dict):
        raise ManifestError(f"{path}: a manifest is a JSON object")
    missing = [key for key in _REQUIRED if not isinstance(payload.get(key), str) or not payload[key]]
    if missing:
        raise ManifestError(f"{path}: missing or empty {', '.join(missing)}")
    return Manifest(
        **{key: payload[key] for key in _REQUIRED},
        hyperparameters=dict(payload.get("hyperparameters") or {}),
        metrics=dict(payload.get("metrics") or {}),
    )


def write_manifest(model_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


def compute_version(model_fingerprint: str, data_sha256: str, hyperparameters: dict[str, Any]) -> str:
    """A short hash of the model (its fingerprint: config, tokenizer, sampled weights) + data + config: the
    same training output always gets the same version."""
    canonical = json.dumps({"model": model_fingerprint, "data": data_sha256, "config": hyperparameters},
                           sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:VERSION_LENGTH]


def build_manifest(model_dir: str | Path, name: str, base_model: str, data_sha256: str,
                   hyperparameters: dict[str, Any], metrics: dict[str, Any]) -> Manifest:
    """The manifest for weights already saved in ``model_dir``."""
    version = compute_version(fingerprint_model_dir(Path(model_dir)), data_sha256, hyperparameters)
    return Manifest(name=name, version=version, base_model=base_model, data_sha256=data_sha256,
                    template_version=TEMPLATE_VERSION, created=datetime.now(UTC).isoformat(),
                    hyperparameters=hyperparameters, metrics=metrics)
