"""``bpo_manifest.json``: written and read back, versions that follow weights, data and config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from optimizer.fingerprint import fingerprint_model_dir
from optimizer.identity import hf_identity
from optimizer.manifest import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    compute_version,
    read_manifest,
    write_manifest,
)
from training.run_config import redact_secrets, saved_config


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


def test_the_version_is_built_from_the_fingerprint_serving_names_a_model_by(tmp_path: Path) -> None:
    # One hash of a model version: the identity a dir without a manifest is served under, and the version
    # bpo train writes for it, come from the same fingerprint.
    directory = model_dir(tmp_path / "bpo-mine", b"weights")
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    fingerprint = fingerprint_model_dir(directory)
    assert hf_identity(str(directory)) == f"hf:bpo-mine@{fingerprint[:12]}"
    written = build_manifest(directory, "bpo-mine", "base", "d1", {"epochs": 1}, {})
    assert written.version == compute_version(fingerprint, "d1", {"epochs": 1})


def test_the_version_follows_the_tokenizer_and_ignores_checkpoints(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, b"weights")
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    before = build_manifest(directory, "n", "b", "d1", {}, {}).version
    (directory / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (directory / "checkpoints" / "checkpoint-5" / "model.safetensors").write_bytes(b"step 5")
    assert build_manifest(directory, "n", "b", "d1", {}, {}).version == before  # kept or not: same model
    (directory / "tokenizer.json").write_text('{"version": "2.0"}')
    assert build_manifest(directory, "n", "b", "d1", {}, {}).version != before


def test_missing_and_broken_manifests(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"name": "x", "version": ""}')
    with pytest.raises(ManifestError, match="version"):
        read_manifest(tmp_path)


@dataclass
class StageConfig:
    model: str = "m"
    critic_api_key: str | None = "sk-1"
    judge_api_key: str | None = None
    hf_token: str = "hf_abc"
    client_secret: str = "s3"
    max_tokens: int = 512
    max_new_tokens: int = 64
    tokenizer: str = "tok"
    extra: dict[str, Any] = field(default_factory=lambda: {"providers": [{"name": "p", "API_KEY": "sk-2"}]})


def test_saved_configs_redact_secret_fields_at_any_depth_and_keep_the_rest() -> None:
    assert saved_config(StageConfig()) == {
        "model": "m", "critic_api_key": "<redacted>", "judge_api_key": None, "hf_token": "<redacted>",
        "client_secret": "<redacted>", "max_tokens": 512, "max_new_tokens": 64, "tokenizer": "tok",
        "extra": {"providers": [{"name": "p", "API_KEY": "<redacted>"}]}}
    assert redact_secrets({"access-token": "t", "password": "p", "tokens": 3}) == {
        "access-token": "<redacted>", "password": "<redacted>", "tokens": 3}
