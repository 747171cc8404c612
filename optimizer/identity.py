"""Optimizer identities (``name@version``): the same model gives the same identity in every process."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from optimizer.fingerprint import fingerprint_model_dir, fingerprint_weights_file
from optimizer.manifest import MANIFEST_NAME, VERSION_LENGTH, ManifestError
from optimizer.manifest import read_manifest as read_optimizer_manifest

log = logging.getLogger("bpo.optimizer")

# What an OpenAI-compatible server's /v1/models card says about the model behind a served name: vLLM's
# ``root`` is the path or hub id it loaded, ``parent`` the base model of a LoRA adapter. ``created`` is left
# out on purpose: vLLM stamps it (and each permission's id) when it answers, so it would differ on every
# probe and in every replica. No field carries a weights revision, and SGLang's ``root`` is the served name.
REMOTE_CARD_FIELDS = ("root", "parent", "max_model_len")


def format_identity(name: str, version: str) -> str:
    return f"{name}@{version}"


def short_hash(*parts: str | bytes, length: int = 12) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def read_manifest(model_dir: Path) -> tuple[str, str] | None:
    """``(name, version)`` from the ``bpo_manifest.json`` that ``bpo train`` writes (optimizer/manifest.py).

    A broken manifest is reported and ignored: the content hash still tells model versions apart.
    """
    try:
        manifest = read_optimizer_manifest(model_dir)
    except ManifestError as exc:
        log.warning("ignoring %s: %s", MANIFEST_NAME, exc)
        return None
    return (manifest.name, manifest.version) if manifest is not None else None


def hf_identity(target: str, commit_hash: str | None = None) -> str:
    """``hf:`` identity: the training manifest's version as written (never recomputed), else the content
    fingerprint of the local dir or file (optimizer/fingerprint.py), else the hub revision."""
    model_dir = Path(os.path.expanduser(target))
    if model_dir.is_dir():
        manifest = read_manifest(model_dir)
        if manifest is not None:
            return format_identity(f"hf:{manifest[0]}", manifest[1])
        return format_identity(f"hf:{model_dir.name or target}", fingerprint_model_dir(model_dir)[:VERSION_LENGTH])
    if model_dir.is_file():  # a GGUF file: its name, and its bytes sampled as a model dir's weights are
        return format_identity(f"hf:{model_dir.name}", fingerprint_weights_file(model_dir).hex()[:VERSION_LENGTH])
    return format_identity(f"hf:{target}", commit_hash[:12] if commit_hash else "unknown-revision")


def remote_identity(model_id: str, card: Mapping[str, object] | None = None) -> str:
    """``remote:`` identity. A served name that carries its version (``bpo@v3``) is used as it is.

    Otherwise ``remote:<id>@<hash>`` of what the server's models card tells about the model (see
    ``REMOTE_CARD_FIELDS``). New weights under the same served name and the same path keep the identity:
    operators version the served name or change ``--cache-namespace`` (docs/optimizer.md).
    """
    if "@" in model_id:
        return f"remote:{model_id}"
    card = card or {}
    described = [f"{field}={card[field]}" for field in REMOTE_CARD_FIELDS if card.get(field) is not None]
    return format_identity(f"remote:{model_id}", short_hash(model_id, *described))
