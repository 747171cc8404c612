"""name@version identities: manifests, content fingerprints of model dirs, hub revisions, remote servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.fingerprint import fingerprint_model_dir
from optimizer.identity import hf_identity, remote_identity
from optimizer.manifest import Manifest, compute_version, write_manifest


def test_hf_identity_prefers_manifest_then_fingerprint_then_hub_revision(model_dir: Path) -> None:
    assert hf_identity(str(model_dir)) == f"hf:bpo-model@{fingerprint_model_dir(model_dir)[:12]}"
    (model_dir / "bpo_manifest.json").write_text('{"name": "broken"}')
    assert hf_identity(str(model_dir)) == f"hf:bpo-model@{fingerprint_model_dir(model_dir)[:12]}"
    assert hf_identity("THUDM/BPO", "0123456789abcdef0123") == "hf:THUDM/BPO@0123456789ab"
    assert hf_identity("THUDM/BPO", None) == "hf:THUDM/BPO@unknown-revision"


def test_a_flat_model_dir_keeps_the_identity_it_had_before_the_fingerprint_moved(model_dir: Path) -> None:
    # hash_model_dir at 96a1fe3 named this dir so; a served model without a manifest keeps its cached rewrites.
    assert hf_identity(str(model_dir)) == "hf:bpo-model@0cbf27ac9103"


def test_a_manifest_version_is_served_as_written_never_recomputed(model_dir: Path) -> None:
    # Written before the fingerprint was the one version hash (it hashed every weight byte then): still trusted.
    written = Manifest(name="bpo-old", version="5f0e8c1d2b3a", base_model="base", data_sha256="ab" * 32,
                       template_version="1", created="2026-01-01T00:00:00+00:00", hyperparameters={"epochs": 3})
    write_manifest(model_dir, written)
    assert compute_version(fingerprint_model_dir(model_dir), written.data_sha256, {"epochs": 3}) != "5f0e8c1d2b3a"
    assert hf_identity(str(model_dir)) == "hf:bpo-old@5f0e8c1d2b3a"


def test_remote_identity() -> None:
    card = {"id": "bpo", "root": "/models/a", "max_model_len": 2048}
    assert remote_identity("bpo@v7", {"root": "/models/x"}) == "remote:bpo@v7"
    assert remote_identity("bpo", card) == remote_identity("bpo", dict(card))
    assert remote_identity("bpo", card) != remote_identity("bpo", {**card, "root": "/models/b"})
    assert remote_identity("bpo", card) != remote_identity("other", card)
    assert remote_identity("bpo").startswith("remote:bpo@")


@pytest.mark.parametrize(("field", "value"), [("parent", "llama-2-7b-chat"), ("max_model_len", 4096)])
def test_remote_identity_follows_what_else_the_card_tells(field: str, value: object) -> None:
    # A LoRA adapter on another base, or a model with another context length, is another model.
    card = {"id": "bpo", "root": "/models/a", "parent": "llama-2-7b", "max_model_len": 2048}
    assert remote_identity("bpo", card) != remote_identity("bpo", {**card, field: value})


def test_remote_identity_ignores_what_vllm_stamps_per_answer() -> None:
    # vLLM sets created and each permission id when it answers /v1/models, not when it loads the model.
    first = {"id": "bpo", "root": "/m", "created": 1700000000, "permission": [{"id": "modelperm-1"}]}
    later = {"id": "bpo", "root": "/m", "created": 1700000060, "permission": [{"id": "modelperm-2"}]}
    assert remote_identity("bpo", first) == remote_identity("bpo", later)


def test_hf_identity_of_a_gguf_file_follows_its_bytes(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    first = hf_identity(str(gguf))
    assert first.startswith("hf:model.Q4_1.gguf@") and first == hf_identity(str(gguf))
    gguf.write_bytes(b"GGUF" + b"\1" * 100)
    assert hf_identity(str(gguf)) != first
