"""The container images: pinned multi-stage builds, non-root, a health check, and a CMD the real CLI accepts."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.cli import build_parser, run_serve
from proxy.settings import load_settings
from tests.deploy.artifacts import (
    DEPLOY,
    ROOT,
    VENV_BIN,
    healthcheck_command,
    image_command,
    pyproject,
    settings_env_names,
    stages,
)

IMAGES = ["Dockerfile", "Dockerfile.gpu"]


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run([str(VENV_BIN / "hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"),
                           *(str(DEPLOY / name) for name in IMAGES)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_to_a_patch_release(name: str) -> None:
    for stage in stages(name):
        _image, _, tag = stage.base.partition(":")
        assert re.match(r"^v?\d+\.\d+\.\d+", tag), f"{name}: {stage.base} is not pinned to a patch release"
        assert "latest" not in tag


@pytest.mark.parametrize("name", IMAGES)
def test_multi_stage_final_stage_takes_only_the_built_venv(name: str) -> None:
    build, final = stages(name)[0], stages(name)[-1]
    assert len(stages(name)) >= 2 and build.name
    copies = final.all("COPY")
    assert [c.value for c in copies] == [("/opt/venv", "/opt/venv")]
    assert copies[0].flags == (f"--from={build.name}",)
    assert final.env()["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    final = stages(name)[-1]
    user = final.last("USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert any(f"--uid {uid}" in c.value[0] for c in final.all("RUN")), "the user must exist in the image"
    order = [c.cmd for c in final.commands]
    assert order.index("USER") < order.index("ENTRYPOINT")


@pytest.mark.parametrize("name", IMAGES)
def test_cmd_is_bpo_serve_as_the_real_cli_parses_it(name: str) -> None:
    command = image_command(name)
    assert command[0] == "bpo" and "bpo" in pyproject()["project"]["scripts"]
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve" and args.handler is run_serve


@pytest.mark.parametrize("name", IMAGES)
def test_image_environment_names_real_settings_and_loads(name: str) -> None:
    env = stages(name)[-1].env()
    unknown = {k for k in env if k.startswith("BPO_")} - settings_env_names()
    assert not unknown, f"{name} sets variables bpo does not read: {unknown}"
    settings = load_settings({}, environ=env)
    # Inside a container the CLI's default 127.0.0.1 would be unreachable.
    assert settings.host == "0.0.0.0"
    assert str(settings.port) in stages(name)[-1].last("EXPOSE").value


@pytest.mark.parametrize("name", IMAGES)
def test_healthcheck_probes_healthz_on_the_configured_port(name: str) -> None:
    check = healthcheck_command(name)
    assert check[:2] == ["python", "-c"]
    assert "/healthz" in check[2] and "BPO_PORT" in check[2]
    flags = dict(f.lstrip("-").split("=") for f in stages(name)[-1].last("HEALTHCHECK").flags)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, a directory match covers its files."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_ships_the_sources_and_nothing_private() -> None:
    sources = {src for name in IMAGES for stage in stages(name) for c in stage.all("COPY") if not c.flags
               for src in c.value[:-1]}
    assert sources == {"pyproject.toml", "README.md", "deploy/constraints.txt", "proxy", "optimizer", "training"}
    for source in sources:
        assert _dockerignore_allows(source), f"{source} is excluded from the build context"
    for module in ("proxy/cli.py", "optimizer/remote.py"):
        assert _dockerignore_allows(module)
    for private in (".git/config", ".venv/bin/python", "deploy/.env", "tests/conftest.py", "runs/x",
                    "proxy/__pycache__/cli.cpython-311.pyc"):
        assert not _dockerignore_allows(private), f"{private} would be sent to the Docker daemon"


def _install_targets(name: str) -> list[str]:
    runs = " ".join(c.value[0] for stage in stages(name) for c in stage.all("RUN"))
    return re.findall(r"pip install -c constraints.txt ([^\s&;]+)", runs)


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distributions a set of requirements pulls in, walked through the metadata installed here."""
    seen: set[str] = set()
    pending = [(r, frozenset(r.extras)) for r in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for raw in metadata.distribution(name).requires or []:
            child = Requirement(raw)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(e) for e in environments):
                pending.append((child, frozenset(child.extras)))
    return seen


def test_slim_image_installs_the_base_package_whose_dependencies_never_reach_torch() -> None:
    assert _install_targets("Dockerfile") == ["."], "the slim image installs no extra"
    base = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    pulled = _closure(base)
    assert "litellm" in pulled and "uvicorn" in pulled  # the walk really follows the dependency tree
    assert not pulled & {"torch", "transformers", "nvidia-cudnn-cu12", "triton"}


def test_gpu_image_installs_the_gpu_extra_with_torch_and_transformers() -> None:
    assert _install_targets("Dockerfile.gpu") == ['"./[gpu]"']
    gpu = {canonicalize_name(Requirement(r).name) for r in pyproject()["project"]["optional-dependencies"]["gpu"]}
    assert {"torch", "transformers"} <= gpu


def test_images_install_from_the_constraints_that_pin_every_dependency() -> None:
    pinned = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(name)] = version
    project = pyproject()["project"]
    for raw in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} breaks {requirement}"
