"""The module map holds: dependencies point one way (lazy imports included), and every module is documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proxy", "optimizer", "training")
# Which of our packages each package may import: proxy -> optimizer <- training.
ALLOWED = {"proxy": {"proxy", "optimizer"}, "optimizer": {"optimizer"}, "training": {"training", "optimizer"}}
# The one crossing: the ``bpo`` entry point registers training's subcommands (never for ``bpo serve``:
# tests/proxy/test_cli.py checks that the gateway's process loads no training module).
ENTRY_POINT = {"proxy/cli.py": {"training"}}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that a module imports anywhere: at the top, in a function, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    crossings = {}
    for path in sorted((ROOT / package).glob("*.py")):
        name = str(path.relative_to(ROOT))
        crossing = imported_packages(path) - ALLOWED[package] - ENTRY_POINT.get(name, set())
        if crossing:
            crossings[name] = sorted(crossing)
    assert not crossings


def test_every_module_is_on_the_map() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [f"{package}/{path.name}" for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))
               if path.name not in ("__init__.py", "__main__.py") and f"| `{path.stem}` |" not in architecture]
    assert not missing, "add these to docs/architecture.md's module map"
