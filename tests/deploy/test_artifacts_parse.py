"""Every YAML, JSON and env file under deploy/ parses, so no artifact ships with a syntax error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.artifacts import DEPLOY, ROOT

STRUCTURED = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")
                    and "models" not in p.relative_to(DEPLOY).parts)


def test_the_artifacts_are_all_found() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in STRUCTURED}
    assert {"docker-compose.yml", "k8s/proxy.yaml", "grafana/bpo-proxy.json", "prometheus/prometheus.yml",
            ".hadolint.yaml"} <= names


@pytest.mark.parametrize("path", STRUCTURED, ids=[p.relative_to(DEPLOY).as_posix() for p in STRUCTURED])
def test_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents and all(isinstance(d, dict) for d in documents)


@pytest.mark.parametrize("path", [DEPLOY / "env.example", ROOT / ".dockerignore"], ids=lambda p: p.name)
def test_line_files_hold_only_entries_and_comments(path: Path) -> None:
    entry = r"[A-Za-z_][A-Za-z0-9_]*=\S*" if path.name == "env.example" else r"!?[^\s#]+"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not line.strip() or line.startswith("#") or re.fullmatch(entry, line), f"{path.name}:{number}"
