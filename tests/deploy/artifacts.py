"""Readers for the deploy/ artifacts, and the names the code defines that those artifacts must use."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib  # type: ignore[no-redef]

from proxy.settings import FIELDS, env_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_version() -> str:
    return str(pyproject()["project"]["version"])


def settings_env_names() -> set[str]:
    """Every ``BPO_*`` variable ``bpo serve`` reads, straight from the settings fields."""
    return {env_name(name) for name, spec in FIELDS.items() if not spec.metadata.get("config_only")}


def bpo_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bBPO_[A-Z0-9_]+\b", text))


def console_script(name: str) -> list[str]:
    """The command a console script runs, built from pyproject's [project.scripts] like pip's launcher."""
    module, _, function = pyproject()["project"]["scripts"][name].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


# --- Dockerfiles -------------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, instruction: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == instruction.upper()]

    def last(self, instruction: str) -> dockerfile.Command:
        found = self.all(instruction)
        assert found, f"stage {self.name or self.base} has no {instruction}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for command in self.all("ENV"):
            pairs = command.value
            values.update(zip(pairs[::2], pairs[1::2], strict=True))
        return values


def stages(name: str) -> list[Stage]:
    """The build stages of ``deploy/<name>``, with ``${ARG}`` in FROM resolved to the ARG's default."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for command in dockerfile.parse_file(str(DEPLOY / name)):
        if command.cmd == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command.value[0])
            stage_name = command.value[2] if len(command.value) == 3 else None
            result.append(Stage(base, stage_name))
        elif not result:
            if command.cmd == "ARG":
                key, _, default = command.value[0].partition("=")
                args[key] = default.strip('"')
        else:
            result[-1].commands.append(command)
    return result


def image_command(name: str) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container runtime joins them."""
    final = stages(name)[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint.json and cmd.json, "ENTRYPOINT and CMD must use the exec (JSON) form"
    return list(entrypoint.value) + list(cmd.value)


def healthcheck_command(name: str) -> list[str]:
    check = stages(name)[-1].last("HEALTHCHECK")
    assert check.json and check.value[0] == "CMD", "HEALTHCHECK must be CMD in exec form"
    return list(check.value[1:])


# --- docker compose ----------------------------------------------------------------------------------------

def compose_config(workdir: Path, profiles: tuple[str, ...] = (), dotenv: str | None = None) -> dict[str, Any]:
    """The compose model after Docker Compose's own loading, validation and interpolation.

    Runs in a copy of deploy/ so a developer's deploy/.env and shell variables never leak in.
    """
    project = workdir / "deploy"
    if not project.exists():
        shutil.copytree(DEPLOY, project, ignore=shutil.ignore_patterns(".env", "models"))
    (project / ".env").unlink(missing_ok=True)
    if dotenv is not None:
        (project / ".env").write_text(dotenv)
    command = [str(VENV_BIN / "docker-compose"), "-f", str(project / "docker-compose.yml")]
    for profile in profiles:
        command += ["--profile", profile]
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir)}
    done = subprocess.run([*command, "config", "--format", "json"], capture_output=True, text=True,
                          env=environ, timeout=60, check=False)
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    return dict(json.loads(done.stdout))


def dotenv_keys(text: str, include_commented: bool) -> dict[str, str]:
    """KEY=value lines of an env file; commented ``# KEY=value`` lines too when asked."""
    pattern = r"^\s*(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$"
    found = {}
    for line in text.splitlines():
        match = re.match(pattern, line)
        if match and (include_commented or not match.group(1)):
            found[match.group(2)] = match.group(3).strip()
    return found


# --- Kubernetes --------------------------------------------------------------------------------------------

def k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every resource under deploy/k8s (examples included), except the kustomization itself."""
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in k8s_documents(path):
                yield path, doc


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in k8s_resources() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(deployment: str, name: str) -> dict[str, Any]:
    spec = k8s_object("Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def container_env(deployment: str, name: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment, name).get("env", []) if "value" in e}


# --- Grafana -----------------------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "bpo-proxy.json").read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


@dataclass(frozen=True)
class Selector:
    """One ``metric{label="value", ...}`` in a PromQL expression, with the labels it groups by."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...]
    grouping: tuple[str, ...]


def selectors(expression: str) -> list[Selector]:
    """The bpo_* selectors of an expression; ``by (...)`` labels are attached to each selector they wrap."""
    grouping = tuple(label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expression)
                     for label in group.split(",") if label.strip())
    found = []
    for metric, braces in re.findall(r"\b(bpo_[a-z0-9_]+)(\{[^}]*\})?", expression):
        matchers = tuple(re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces))
        found.append(Selector(metric, matchers, grouping))
    return found
