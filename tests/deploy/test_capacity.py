"""The capacity model: its arithmetic, and the README's worked example being exactly its output."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from types import ModuleType

from tests.deploy.artifacts import DEPLOY, ROOT


def _load_capacity() -> ModuleType:
    """deploy/ is not a package: load the script from its path, as ``python deploy/capacity.py`` runs it."""
    spec = importlib.util.spec_from_file_location("bpo_deploy_capacity", DEPLOY / "capacity.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


capacity = _load_capacity()

EXAMPLE = capacity.Inputs(requests_per_second=2000, optimized_share=0.9, replica_requests_per_second=500,
                          gpu_rewrites_per_second=100)


def test_gpus_follow_cache_misses_and_replicas_follow_traffic() -> None:
    half = capacity.plan(EXAMPLE, hit_rate=0.5)
    assert half.rewrites_per_second == 900
    assert half.proxy_replicas == 7  # ceil(2000 / (500 * 0.65))
    assert half.optimizer_gpus == 14  # ceil(900 / (100 * 0.7)) + 1 spare
    assert half.redis_ops_per_second == 1800 * (1 + 4 * 0.5)
    better = capacity.plan(EXAMPLE, hit_rate=0.9)
    assert better.proxy_replicas == half.proxy_replicas
    assert better.optimizer_gpus < half.optimizer_gpus


def test_small_and_empty_loads_keep_the_floors() -> None:
    tiny = capacity.Inputs(1, 1.0, 500, 100)
    assert capacity.plan(tiny, 0.0).proxy_replicas == 2  # never a single replica
    assert capacity.plan(tiny, 0.0).optimizer_gpus == 2  # one serving GPU plus the spare
    assert capacity.plan(capacity.Inputs(1000, 0.0, 500, 100), 0.0).optimizer_gpus == 0


def test_readme_worked_example_is_the_scripts_output() -> None:
    readme = (DEPLOY / "README.md").read_text()
    block = re.search(r"```console\n\$ (python deploy/capacity\.py[^\n]*)\n(.*?)```", readme, re.S)
    assert block, "deploy/README.md lost its worked example"
    argv = shlex.split(block.group(1))[1:]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == block.group(2).strip()
    row = next(line.split() for line in done.stdout.splitlines() if line.split()[0] == "0.50")
    replicas, rewrites, gpus = row[2], row[1], row[3]
    assert f"= {replicas} proxy replicas" in readme and f"= {rewrites} rewrites/s" in readme
    assert f"+ 1 = {gpus} GPUs" in readme
