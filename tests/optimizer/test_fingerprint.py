"""The one model fingerprint: what counts as a change of model, for serving identities and training versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optimizer.fingerprint import fingerprint_model_dir, fingerprint_weights_file


def test_fingerprint_is_stable_and_ignores_non_model_files(model_dir: Path, tmp_path: Path) -> None:
    before = fingerprint_model_dir(model_dir)
    (model_dir / "README.md").write_text("other notes")
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    assert fingerprint_model_dir(model_dir) == before == fingerprint_model_dir(copy)
    assert len(before) == 64


@pytest.mark.parametrize("changed", ["config.json", "tokenizer.json", "model.safetensors"])
def test_fingerprint_changes_with_config_tokenizer_or_weights(model_dir: Path, changed: str) -> None:
    before = fingerprint_model_dir(model_dir)
    path = model_dir / changed
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    assert fingerprint_model_dir(model_dir) != before


def test_subfolders_are_not_the_model(model_dir: Path) -> None:
    # bpo train writes its manifest while OUTPUT/checkpoints still exists; a hub snapshot may hold original/.
    before = fingerprint_model_dir(model_dir)
    checkpoint = model_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"another model")
    (checkpoint / "config.json").write_text("{}")
    assert fingerprint_model_dir(model_dir) == before


def test_large_weights_are_sampled_and_both_ends_count(model_dir: Path) -> None:
    # 16 KiB of weights is "large" for 1 KiB samples: 8 samples cover half of it, both ends included.
    weights = model_dir / "model.safetensors"
    before = fingerprint_model_dir(model_dir, sample_bytes=1024)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last sample ends at the end of the file
    weights.write_bytes(bytes(data))
    assert fingerprint_model_dir(model_dir, sample_bytes=1024) != before


def test_a_weights_file_counts_its_size_even_where_no_sample_reads(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(bytes(16 * 1024))
    before = fingerprint_weights_file(weights, sample_bytes=1024)
    weights.write_bytes(bytes(16 * 1024 + 1))
    assert fingerprint_weights_file(weights, sample_bytes=1024) != before
