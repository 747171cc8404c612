"""Optimizer identities (``name@version``): the same model gives the same identity in every process."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_FILE = "bpo_manifest.json"
# Files whose content decides what a model dir generates; the weights are sampled, the rest hashed whole.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "adapter_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Hashing 13 GB of weights would take longer than loading them; a fine-tune changes every tensor, so a
# few spread-out chunks plus the exact size tell versions apart.
WEIGHT_SAMPLES = 8
SAMPLE_BYTES = 1 << 20


def format_identity(name: str, version: str) -> str:
    return f"{name}@{version}"


def short_hash(*parts: str | bytes, length: int = 12) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def read_manifest(model_dir: Path) -> tuple[str, str] | None:
    """``(name, version)`` from the ``bpo_manifest.json`` that ``bpo train`` writes, if there is a usable one."""
    try:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    name, version = (manifest.get("name"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
    if isinstance(name, str) and name and isinstance(version, (str, int)) and str(version):
        return name, str(version)
    return None


def hash_model_dir(model_dir: Path) -> str:
    """A content fingerprint of a model directory: config and tokenizer files whole, weights sampled."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(model_dir).as_posix()
        if path.name in CONFIG_FILES:
            digest.update(relative.encode() + b"\0" + path.read_bytes())
        elif path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(relative.encode() + b"\0" + _sample_file(path))
    return digest.hexdigest()[:12]


def _sample_file(path: Path) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WEIGHT_SAMPLES * SAMPLE_BYTES:
            digest.update(handle.read())
            return digest.digest()
        step = (size - SAMPLE_BYTES) // (WEIGHT_SAMPLES - 1)
        for index in range(WEIGHT_SAMPLES):
            handle.seek(index * step)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.digest()


def hf_identity(target: str, commit_hash: str | None = None) -> str:
    """``hf:`` identity: the training manifest, else a hash of the local dir, else the hub revision."""
    model_dir = Path(os.path.expanduser(target))
    if model_dir.is_dir():
        manifest = read_manifest(model_dir)
        if manifest is not None:
            return format_identity(f"hf:{manifest[0]}", manifest[1])
        return format_identity(f"hf:{model_dir.name or target}", hash_model_dir(model_dir))
    return format_identity(f"hf:{target}", commit_hash[:12] if commit_hash else "unknown-revision")


def remote_identity(model_id: str, root: str | None) -> str:
    """``remote:`` identity. A served name that carries its version (``bpo@v3``) is used as it is."""
    if "@" in model_id:
        return f"remote:{model_id}"
    return format_identity(f"remote:{model_id}", short_hash(root or model_id))
