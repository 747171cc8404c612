"""deploy/k8s: schema-valid offline, and wired to each other and to the code (probes, ports, settings)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from proxy.cli import build_parser
from proxy.settings import load_settings
from tests.deploy.artifacts import (
    K8S,
    bpo_names_in,
    container,
    container_env,
    image_command,
    k8s_documents,
    k8s_object,
    k8s_resources,
    project_version,
    settings_env_names,
    stages,
)

# The oldest Kubernetes these manifests promise to work on, and the newest schema shipped offline.
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
RESOURCES = list(k8s_resources())


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    return f"{item[1]['kind']}/{item[1]['metadata']['name']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", RESOURCES, ids=[_id(r) for r in RESOURCES])
def test_resource_matches_the_kubernetes_schema(item: tuple[Path, dict[str, Any]], version: str) -> None:
    # strict: an unknown or misspelt field is an error, not something the API server silently drops.
    kubernetes_validate.validate(item[1], version, strict=True)


def test_offline_validation_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(k8s_object("Deployment", "bpo-proxy"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kustomization["namespace"] == k8s_object("Namespace", kustomization["namespace"])["metadata"]["name"]
    assert not any("namespace" in doc["metadata"] for name in listed for doc in k8s_documents(K8S / name)
                   if doc["kind"] != "Namespace"), "kustomize sets the namespace; manifests stay portable"


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def _deployments() -> list[dict[str, Any]]:
    return [doc for _, doc in RESOURCES if doc["kind"] == "Deployment"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_service_selects_one_deployment_on_a_named_container_port() -> None:
    for _, service in (r for r in RESOURCES if r[1]["kind"] == "Service"):
        matched = [d for d in _deployments() if _selects(service["spec"]["selector"], _pod_labels(d))]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} Deployments"
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_deployment_selectors_match_their_pods() -> None:
    for deployment in _deployments():
        assert _selects(deployment["spec"]["selector"]["matchLabels"], _pod_labels(deployment))


def test_proxy_probes_use_healthz_and_readyz_on_the_port_it_listens_on() -> None:
    proxy = container("bpo-proxy", "proxy")
    port = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert int(container_env("bpo-proxy", "proxy")["BPO_PORT"]) == port["http"]
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert proxy["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("deployment", ["bpo-proxy", "bpo-optimizer"])
def test_prometheus_scrape_annotations_point_at_the_metrics_port(deployment: str) -> None:
    pod = k8s_object("Deployment", deployment)["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in ports
    assert annotations["prometheus.io/path"] == "/metrics"


def _config_path_and_args() -> tuple[Path, list[str]]:
    proxy = container("bpo-proxy", "proxy")
    command = image_command("Dockerfile")[:1] + proxy["args"]
    args = build_parser().parse_args(command[1:])
    return Path(args.config), command


def test_proxy_args_parse_with_the_real_cli_and_name_the_mounted_config() -> None:
    config, command = _config_path_and_args()
    assert command[:2] == ["bpo", "serve"]
    proxy = container("bpo-proxy", "proxy")
    mount = next(m for m in proxy["volumeMounts"] if config.is_relative_to(m["mountPath"]))
    volumes = k8s_object("Deployment", "bpo-proxy")["spec"]["template"]["spec"]["volumes"]
    source = next(v for v in volumes if v["name"] == mount["name"])["configMap"]["name"]
    assert config.name in k8s_object("ConfigMap", source)["data"]


def _secret_keys() -> set[str]:
    return set(k8s_object("Secret", "bpo-provider-keys")["stringData"])


@pytest.fixture
def proxy_settings(tmp_path: Path) -> Any:
    """The ConfigMap's config.yaml plus the Deployment's env, through the real settings loader."""
    config = tmp_path / "config.yaml"
    config.write_text(k8s_object("ConfigMap", "bpo-config")["data"]["config.yaml"])
    # The pod gets the Secret's keys through envFrom; a route whose os.environ/NAME is unset stops the start.
    secrets = {name: "sk-example" for name in _secret_keys()}
    environ = container_env("bpo-proxy", "proxy") | secrets | {"BPO_CONFIG": str(config)}
    return load_settings({}, environ=environ)


def test_configmap_config_loads_with_the_real_settings_loader(proxy_settings: Any) -> None:
    assert proxy_settings.host == "0.0.0.0"
    assert proxy_settings.optimizer.startswith("remote:")
    assert proxy_settings.model_list, "the example litellm route is parsed"


def _service_url_matches(url: str, service_name: str) -> None:
    service = k8s_object("Service", service_name)
    parsed = urlsplit(url)
    assert parsed.hostname == service_name
    assert parsed.port in {p["port"] for p in service["spec"]["ports"]}


def test_proxy_reaches_the_optimizer_and_redis_through_their_services(proxy_settings: Any) -> None:
    _service_url_matches(proxy_settings.optimizer.removeprefix("remote:"), "bpo-optimizer")
    _service_url_matches(proxy_settings.cache, "bpo-redis")
    _service_url_matches(proxy_settings.events, "bpo-redis")
    assert urlsplit(proxy_settings.cache).path != urlsplit(proxy_settings.events).path


def test_every_bpo_variable_and_secret_reference_is_real() -> None:
    manifests = "".join(p.read_text() for p in sorted(K8S.rglob("*.yaml")))
    unknown = bpo_names_in(manifests) - settings_env_names()
    assert not unknown, f"manifests name variables bpo does not read: {unknown}"
    config = k8s_object("ConfigMap", "bpo-config")["data"]["config.yaml"]
    referenced = set(re.findall(r"os\.environ/(\w+)", config))
    assert referenced and referenced <= _secret_keys(), "every os.environ/NAME key has a slot in the Secret"
    proxy = container("bpo-proxy", "proxy")
    assert {"secretRef": {"name": "bpo-provider-keys", "optional": True}} in proxy["envFrom"]


def test_the_secret_is_an_example_kept_out_of_kubectl_apply() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    secret_files = [p for p, doc in RESOURCES if doc["kind"] == "Secret"]
    assert secret_files and all(p.parent.name == "examples" for p in secret_files)
    assert not any(r.startswith("examples") for r in kustomization["resources"])


def test_hpa_and_pdb_cover_the_proxy() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "bpo-proxy")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bpo-proxy"}
    assert hpa["minReplicas"] >= 2
    assert container("bpo-proxy", "proxy")["resources"]["requests"]["cpu"], "CPU utilization needs a request"
    pdb = k8s_object("PodDisruptionBudget", "bpo-proxy")["spec"]
    assert _selects(pdb["selector"]["matchLabels"], _pod_labels(k8s_object("Deployment", "bpo-proxy")))
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"], "drains must proceed"


def test_proxy_rolls_without_losing_capacity_and_drains_streams() -> None:
    deployment = k8s_object("Deployment", "bpo-proxy")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    pause = int(container("bpo-proxy", "proxy")["lifecycle"]["preStop"]["exec"]["command"][1])
    # uvicorn drains in-flight streams for 30 s (proxy/cli.py) after the preStop pause.
    assert pod["terminationGracePeriodSeconds"] > pause + 30


def test_pods_run_as_non_root_with_the_images_uid() -> None:
    image_uid = int(stages("Dockerfile")[-1].last("USER").value[0].split(":")[0])
    assert k8s_object("Deployment", "bpo-proxy")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] \
        == image_uid
    proxy = container("bpo-proxy", "proxy")
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in proxy["volumeMounts"])


def test_images_are_pinned_and_ours_carry_the_project_version() -> None:
    for deployment in _deployments():
        for spec in deployment["spec"]["template"]["spec"]["containers"]:
            tag = spec["image"].rpartition(":")[2]
            assert re.match(r"^v?\d+\.\d+\.\d+", tag), f"{spec['image']} is not pinned"
    assert container("bpo-proxy", "proxy")["image"] == f"bpo-proxy:{project_version()}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {"name": "bpo-proxy", "newTag": project_version()} in kustomization["images"]


def test_vllm_serves_the_optimizer_on_one_gpu() -> None:
    vllm = container("bpo-optimizer", "vllm")
    args = dict(a.removeprefix("--").split("=", 1) for a in vllm["args"])
    assert args["model"] == "THUDM/BPO" and args["dtype"] == "bfloat16"
    port = {p["name"]: p["containerPort"] for p in vllm["ports"]}["http"]
    assert int(args["port"]) == port
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"


def test_the_proxy_runs_with_client_keys_in_a_persistent_redis(proxy_settings: Any) -> None:
    from proxy.open_relay import open_relay_problem

    assert proxy_settings.client_auth == "on" and proxy_settings.admin_key
    _service_url_matches(proxy_settings.key_store, "bpo-redis")
    paths = {urlsplit(u).path for u in (proxy_settings.cache, proxy_settings.events)}
    assert urlsplit(proxy_settings.key_store).path not in paths
    assert open_relay_problem(proxy_settings) is None
    redis = container("bpo-redis", "redis")
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    volumes = k8s_object("Deployment", "bpo-redis")["spec"]["template"]["spec"]["volumes"]
    claim = next(v for v in volumes if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert k8s_object("PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"]
