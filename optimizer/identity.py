"""Optimizer identities (``name@version``): the same model gives the same identity in every process."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from optimizer.manifest import MANIFEST_NAME, ManifestError
from optimizer.manifest import read_manifest as read_optimizer_manifest

log = logging.getLogger("bpo.optimizer")

# Files whose content decides what a model dir generates; the weights are sampled, the rest hashed whole.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "adapter_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Hashing 13 GB of weights would take longer than loading them; a fine-tune changes every tensor, so a
# few spread-out chunks plus the exact size tell versions apart.
WEIGHT_SAMPLES = 8
SAMPLE_BYTES = 1 << 20
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


def hash_model_dir(model_dir: Path, sample_bytes: int = SAMPLE_BYTES) -> str:
    """A content fingerprint of a model directory: config and tokenizer files whole, weights sampled."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(model_dir).as_posix()
        if path.name in CONFIG_FILES:
            digest.update(relative.encode() + b"\0" + path.read_bytes())
        elif path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(relative.encode() + b"\0" + _sample_file(path, sample_bytes))
    return digest.hexdigest()[:12]


def _sample_file(path: Path, sample_bytes: int) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WEIGHT_SAMPLES * sample_bytes:
            digest.update(handle.read())
            return digest.digest()
        # Evenly spread, the first at the start of the file and the last ending at its end.
        for index in range(WEIGHT_SAMPLES):
            handle.seek(index * (size - sample_bytes) // (WEIGHT_SAMPLES - 1))
            digest.update(handle.read(sample_bytes))
    return digest.digest()


def hf_identity(target: str, commit_hash: str | None = None) -> str:
    """``hf:`` identity: the training manifest, else a hash of the local dir or file, else the hub revision."""
    model_dir = Path(os.path.expanduser(target))
    if model_dir.is_dir():
        manifest = read_manifest(model_dir)
        if manifest is not None:
            return format_identity(f"hf:{manifest[0]}", manifest[1])
        return format_identity(f"hf:{model_dir.name or target}", hash_model_dir(model_dir))
    if model_dir.is_file():  # a GGUF file: its name, and its bytes sampled as a model dir's weights are
        return format_identity(f"hf:{model_dir.name}", _sample_file(model_dir, SAMPLE_BYTES).hex()[:12])
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
