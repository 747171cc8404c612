"""``bpo_manifest.json``: written and read back, versions that follow weights, data and config."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.manifest import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    compute_version,
    read_manifest,
    write_manifest,
)


def model_dir(tmp_path: Path, weights: bytes) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.safetensors").write_bytes(weights)
    return tmp_path


def test_manifest_round_trips_and_names_the_optimizer(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, b"weights")
    written = build_manifest(directory, "bpo-mine", "meta-llama/Llama-2-7b-chat-hf", "ab" * 32,
                             {"learning_rate": 2e-5}, {"train_loss": 1.5})
    write_manifest(directory, written)
    read = read_manifest(directory)
    assert read == written
    assert read.identity == f"bpo-mine@{written.version}"
    assert read.template_version == "1" and read.created.endswith("+00:00")


def test_version_follows_weights_data_and_config(tmp_path: Path) -> None:
    config = {"learning_rate": 2e-5, "epochs": 3}
    one = build_manifest(model_dir(tmp_path / "a", b"w1"), "n", "b", "d1", config, {}).version
    same = build_manifest(model_dir(tmp_path / "b", b"w1"), "n", "b", "d1", config, {"loss": 9}).version
    assert one == same  # metrics and the time of writing do not make a new version
    assert build_manifest(model_dir(tmp_path / "c", b"w2"), "n", "b", "d1", config, {}).version != one
    assert compute_version("x", "d1", config) != compute_version("x", "d2", config)
    assert compute_version("x", "d1", config) != compute_version("x", "d1", {**config, "epochs": 2})


def test_missing_and_broken_manifests(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"name": "x", "version": ""}')
    with pytest.raises(ManifestError, match="version"):
        read_manifest(tmp_path)
