"""docker-compose.yml, as Docker Compose itself loads it: services, health checks, wiring and env names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.settings import load_settings
from tests.deploy.artifacts import (
    DEPLOY,
    compose_config,
    dotenv_keys,
    healthcheck_command,
    project_version,
    settings_env_names,
)

ENV_EXAMPLE = (DEPLOY / "env.example").read_text()
ALL_PROFILES = ("vllm", "gpu", "monitoring")
PROXIES = {"proxy": "Dockerfile", "proxy-gpu": "Dockerfile.gpu"}


def _with_vllm_enabled(text: str) -> str:
    """env.example with its two commented vLLM lines switched on, as its comment tells users to."""
    return re.sub(r"^# (COMPOSE_PROFILES=vllm|BPO_OPTIMIZER=remote:.*)$", r"\1", text, flags=re.M)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(tmp_path_factory.mktemp("compose"), ALL_PROFILES, dotenv=ENV_EXAMPLE)


def test_profiles_select_the_services(tmp_path: Path) -> None:
    assert set(compose_config(tmp_path)["services"]) == {"proxy", "redis"}
    assert set(compose_config(tmp_path, ("vllm",))["services"]) == {"proxy", "redis", "vllm"}
    assert set(compose_config(tmp_path, ("gpu",))["services"]) == {"proxy", "proxy-gpu", "redis"}
    assert set(compose_config(tmp_path, ("monitoring",))["services"]) == {"proxy", "redis", "prometheus",
                                                                           "grafana"}


def test_env_example_switches_on_vllm_and_points_the_proxy_at_it(tmp_path: Path) -> None:
    model = compose_config(tmp_path, dotenv=_with_vllm_enabled(ENV_EXAMPLE))
    assert "vllm" in model["services"], "COMPOSE_PROFILES in .env turns the profile on"
    spec = model["services"]["proxy"]["environment"]["BPO_OPTIMIZER"]
    kind, _, url = spec.partition(":")
    assert kind == "remote"
    command = model["services"]["vllm"]["command"]
    assert urlsplit(url).hostname == "vllm"
    assert urlsplit(url).port == int(command[command.index("--port") + 1])
    assert command[command.index("--dtype") + 1] == "bfloat16"


def test_every_service_has_a_healthcheck(full: dict[str, Any]) -> None:
    for name, service in full["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_proxy_healthchecks_are_the_images_own(full: dict[str, Any]) -> None:
    for name, image in PROXIES.items():
        assert full["services"][name]["healthcheck"]["test"][1:] == healthcheck_command(image)


def test_proxies_start_after_redis_is_healthy(full: dict[str, Any]) -> None:
    for name in PROXIES:
        assert full["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def _proxy_env(full: dict[str, Any], name: str) -> dict[str, str]:
    return {k: v for k, v in full["services"][name]["environment"].items() if v is not None}


@pytest.mark.parametrize("name", list(PROXIES))
def test_proxy_environment_names_real_settings_and_loads(full: dict[str, Any], name: str) -> None:
    env = _proxy_env(full, name)
    unknown = {k for k in env if k.startswith("BPO_")} - settings_env_names()
    assert not unknown, f"{name} sets variables bpo does not read: {unknown}"
    settings = load_settings({}, environ=env)
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    published = {p["target"] for p in full["services"][name]["ports"]}
    assert published == {settings.port}


@pytest.mark.parametrize("name", list(PROXIES))
def test_cache_and_events_point_at_the_redis_service(full: dict[str, Any], name: str) -> None:
    env = _proxy_env(full, name)
    for variable in ("BPO_CACHE", "BPO_EVENTS"):
        url = urlsplit(env[variable])
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert env["BPO_CACHE"] != env["BPO_EVENTS"], "cache and event stream keep to separate databases"
    assert full["services"]["redis"]["command"][0] == "redis-server"


def test_gpu_services_reserve_an_nvidia_gpu(full: dict[str, Any]) -> None:
    for name in ("vllm", "proxy-gpu"):
        devices = full["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in full["services"]["proxy"], "the slim proxy runs on any machine"


def test_model_directories_are_mounted(full: dict[str, Any]) -> None:
    for name in ("vllm", "proxy-gpu"):
        targets = {v["target"]: v for v in full["services"][name]["volumes"]}
        assert targets["/models"]["read_only"] is True
    gpu_targets = {v["target"] for v in full["services"]["proxy-gpu"]["volumes"]}
    assert "/var/cache/bpo/huggingface" in gpu_targets  # HF_HOME of Dockerfile.gpu


def test_images_are_pinned_and_ours_carry_the_project_version(full: dict[str, Any]) -> None:
    for name, service in full["services"].items():
        _image, _, tag = service["image"].rpartition(":")
        assert re.match(r"^v?\d+\.\d+\.\d+", tag), f"{name}: {service['image']} is not pinned"
        if "build" in service:
            assert tag == project_version()
            assert service["build"]["dockerfile"] == f"deploy/{PROXIES[name]}"


def test_bind_mounted_files_exist_in_deploy(full: dict[str, Any], tmp_path: Path) -> None:
    checked = 0
    for service in full["services"].values():
        for volume in service.get("volumes", []):
            if volume["type"] != "bind" or volume["target"] == "/models":
                continue
            relative = Path(volume["source"]).parts[Path(volume["source"]).parts.index("deploy") + 1:]
            assert (DEPLOY.joinpath(*relative)).exists(), f"{volume['source']} is missing from deploy/"
            checked += 1
    assert checked >= 3


def test_env_example_names_only_real_settings_and_compose_variables() -> None:
    compose_text = (DEPLOY / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{(\w+)", compose_text))
    keys = set(dotenv_keys(ENV_EXAMPLE, include_commented=True))
    bpo = {k for k in keys if k.startswith("BPO_")}
    assert not bpo - settings_env_names(), f"env.example names unknown settings: {bpo - settings_env_names()}"
    others = keys - bpo - {"COMPOSE_PROFILES"}
    assert others <= interpolated, f"env.example variables compose never reads: {others - interpolated}"
    undocumented = {v for v in interpolated if not v.startswith("BPO_")} - keys
    assert not undocumented, f"compose variables missing from env.example: {undocumented}"


def test_prometheus_scrapes_every_proxy_service_on_its_port(full: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    discovery = jobs["bpo-proxy"]["dns_sd_configs"][0]
    assert set(discovery["names"]) == set(PROXIES)
    assert discovery["port"] == 8000 and jobs["bpo-proxy"]["metrics_path"] == "/metrics"


def test_grafana_provisioning_finds_the_dashboard_and_prometheus(full: dict[str, Any]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "bpo.yaml").read_text())["providers"][0]
    mounts = {Path(v["source"]).name: v["target"] for v in full["services"]["grafana"]["volumes"]
              if v["type"] == "bind"}
    assert str(Path(mounts["bpo-proxy.json"]).parent) == provider["options"]["path"]
    assert mounts["provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.hostname in full["services"]
    assert {p["target"] for p in full["services"]["prometheus"]["ports"]} == {url.port}


@pytest.mark.parametrize("name", list(PROXIES))
def test_proxies_run_with_client_keys_in_redis_and_are_no_open_relay(full: dict[str, Any], name: str) -> None:
    from proxy.open_relay import open_relay_problem

    env = _proxy_env(full, name)
    settings = load_settings({}, environ=env)
    assert settings.client_auth == "on" and settings.admin_key
    store = urlsplit(settings.key_store)
    assert (store.scheme, store.hostname, store.port) == ("redis", "redis", 6379)
    assert store.path not in {urlsplit(settings.cache).path, urlsplit(settings.events).path}
    assert open_relay_problem(settings) is None
    assert "--appendonly" in (command := full["services"]["redis"]["command"])
    assert command[command.index("--appendonly") + 1] == "yes", "keys and spend survive a Redis restart"
