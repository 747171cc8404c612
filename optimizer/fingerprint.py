"""A model's content fingerprint: the one hash of a model version, for serving identities and training manifests.

``hf_identity`` (optimizer/identity.py) names a model dir without a manifest by it, and ``bpo train``
(``build_manifest``, optimizer/manifest.py) builds the version it writes into the manifest from it, so the
two can never disagree on what counts as a change of model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files whose content decides what a model dir generates; the weights are sampled, the rest hashed whole.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "adapter_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Hashing 13 GB of weights would take longer than loading them (a 100 MB file, page cache warm: 6 ms sampled,
# 80 ms whole; docs/optimizer.md); a fine-tune changes every tensor, so a few spread-out chunks plus the exact
# size tell versions apart.
WEIGHT_SAMPLES = 8
SAMPLE_BYTES = 1 << 20


def fingerprint_model_dir(model_dir: Path, sample_bytes: int = SAMPLE_BYTES) -> str:
    """SHA-256 (hex) of the files at the top of ``model_dir``, the ones ``from_pretrained`` reads: config and
    tokenizer files whole, each weight file by its size and samples. Subfolders (a training run's
    ``checkpoints/``, a hub snapshot's ``original/``) are not the model and are left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if path.name in CONFIG_FILES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(path.name.encode() + b"\0" + fingerprint_weights_file(path, sample_bytes))
    return digest.hexdigest()


def fingerprint_weights_file(path: Path, sample_bytes: int = SAMPLE_BYTES) -> bytes:
    """SHA-256 (digest) of a weight file's size and bytes: all of them when small, else evenly spread samples."""
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
