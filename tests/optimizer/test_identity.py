"""name@version identities: manifests, content hashes of model dirs, hub revisions, remote servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optimizer.identity import hash_model_dir, hf_identity, remote_identity


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bpo-model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (directory / "README.md").write_text("notes")
    return directory


def test_hash_is_stable_and_ignores_non_model_files(model_dir: Path, tmp_path: Path) -> None:
    before = hash_model_dir(model_dir)
    (model_dir / "README.md").write_text("other notes")
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    assert hash_model_dir(model_dir) == before == hash_model_dir(copy)


@pytest.mark.parametrize("changed", ["config.json", "tokenizer.json", "model.safetensors"])
def test_hash_changes_with_config_tokenizer_or_weights(model_dir: Path, changed: str) -> None:
    before = hash_model_dir(model_dir)
    path = model_dir / changed
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    assert hash_model_dir(model_dir) != before


def test_large_weights_are_sampled_and_both_ends_count(model_dir: Path) -> None:
    # 16 KiB of weights is "large" for 1 KiB samples: 8 samples cover half of it, both ends included.
    weights = model_dir / "model.safetensors"
    before = hash_model_dir(model_dir, sample_bytes=1024)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last sample ends at the end of the file
    weights.write_bytes(bytes(data))
    assert hash_model_dir(model_dir, sample_bytes=1024) != before


def test_hf_identity_prefers_manifest_then_hash_then_hub_revision(model_dir: Path) -> None:
    assert hf_identity(str(model_dir)) == f"hf:bpo-model@{hash_model_dir(model_dir)}"
    (model_dir / "bpo_manifest.json").write_text('{"name": "broken"}')
    assert hf_identity(str(model_dir)) == f"hf:bpo-model@{hash_model_dir(model_dir)}"
    assert hf_identity("THUDM/BPO", "0123456789abcdef0123") == "hf:THUDM/BPO@0123456789ab"
    assert hf_identity("THUDM/BPO", None) == "hf:THUDM/BPO@unknown-revision"


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
