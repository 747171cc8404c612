"""Launcher configs shipped with the package: accelerate (DDP, DeepSpeed ZeRO-2, FSDP) and DeepSpeed JSON.

``python -m training.configs NAME`` prints a config's path, for ``accelerate launch --config_file``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTENSIONS = (".yaml", ".json")


def available() -> list[str]:
    return sorted(p.stem for p in HERE.iterdir() if p.suffix in EXTENSIONS)


def config_path(name: str) -> Path:
    """The shipped config called ``name`` (e.g. ``accelerate_zero2``, ``deepspeed_zero3``)."""
    for extension in EXTENSIONS:
        path = HERE / f"{name}{extension}"
        if path.is_file():
            return path
    from training.errors import ConfigError

    raise ConfigError(f"no shipped config {name!r}: choose one of {', '.join(available())}")
