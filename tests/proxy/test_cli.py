"""``bpo`` as users run it: a real process, its help, its exit codes, its graceful shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from proxy.cli import build_parser
from tests.fakes.proxy_server import REPO, ProxyProcess
from tests.fakes.upstream import FakeUpstream, Reply, free_port

# `bpo` as processes: each start imports the whole gateway.
pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def bpo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or ENV, timeout=60)


def test_help_lists_every_command_of_the_interface() -> None:
    result = bpo("--help")
    assert result.returncode == 0
    for command in ("serve", "rewrite", "data", "train", "eval", "ab"):
        assert command in result.stdout
    serve_help = bpo("serve", "--help").stdout
    for flag in ("--host", "--port", "--config", "--upstream-base-url", "--optimizer", "--cache",
                 "--ab-treatment-percent", "--events", "BPO_UPSTREAM_BASE_URL"):
        assert flag in serve_help


def test_a_bad_setting_exits_2_with_a_message_naming_it() -> None:
    result = bpo("serve", "--cache", "memcached://x")
    assert result.returncode == 2
    assert "--cache" in result.stderr and "Traceback" not in result.stderr
    result = bpo("serve", env={**ENV, "BPO_PORT": "not-a-port"})
    assert result.returncode == 2 and "BPO_PORT" in result.stderr


def test_serve_process_proxies_with_settings_from_the_environment(upstream: FakeUpstream) -> None:
    proxy = ProxyProcess(["--optimizer", f"remote:{upstream.base_url}"],
                         env={"BPO_UPSTREAM_BASE_URL": upstream.base_url, "BPO_CACHE": "none",
                              "BPO_UPSTREAM_API_KEY": "sk-server-secret-42"}).start()
    try:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "Tell a joke"}])
        assert raw.headers["x-bpo-applied"] == "true" and raw.headers["x-bpo-cache"] == "off"
        request_id = raw.headers["x-request-id"]
    finally:
        output = proxy.stop()
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (entry,) = [e for e in logged if e.get("request_id") == request_id]
    assert entry["message"] == "chat completion" and entry["status"] == 200 and entry["applied"] is True
    assert "Tell a joke" not in output  # prompt text never reaches the logs at INFO
    assert "Bearer k" not in output and "sk-server-secret-42" not in output  # nor any key
    assert upstream.requests_to("/v1/chat/completions")[-1].headers["authorization"] == "Bearer sk-server-secret-42"


def test_shutdown_drains_an_in_flight_stream(upstream: FakeUpstream) -> None:
    chunks = [b"data: {\"n\": %d}\n\n" % i for i in range(20)] + [b"data: [DONE]\n\n"]
    upstream.responders["/v1/chat/completions"] = lambda rec: Reply(sse=chunks, chunk_delay=0.05)
    proxy = ProxyProcess(["--optimizer", "none", "--upstream-base-url", upstream.base_url]).start()
    received: list[bytes] = []
    started = threading.Event()

    def consume() -> None:
        body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "go"}]}
        with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body, timeout=20) as response:
            for chunk in response.iter_raw():
                started.set()
                received.append(chunk)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
    proxy.stop()  # SIGTERM while the stream is still going
    reader.join(20)
    assert b"".join(received) == b"".join(chunks)


@pytest.mark.parametrize("spec", ["hf:/nonexistent/model-dir"])
def test_require_optimizer_fails_start_when_it_cannot_load(spec: str, upstream: FakeUpstream) -> None:
    result = bpo("serve", "--optimizer", spec, "--require-optimizer", "--upstream-base-url", upstream.base_url,
                 "--port", "0")
    assert result.returncode != 0
    # One clear JSON line says why; no traceback, as a line or inside one.
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    errors = [line["message"] for line in lines if line["level"] == "error" and "require-optimizer" in line["message"]]
    assert len(errors) == 1 and "no such directory" in errors[0]
    assert "Traceback" not in result.stderr and "StartupError" not in result.stderr


def test_workers_share_the_port_and_merge_their_metrics(upstream: FakeUpstream, tmp_path: Path) -> None:
    proxy = ProxyProcess(["--workers", "2", "--optimizer", "none", "--upstream-base-url", upstream.base_url],
                         env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}).start()
    try:
        assert proxy.process is not None
        children = subprocess.run(["pgrep", "-P", str(proxy.process.pid)], capture_output=True, text=True)
        workers = [pid for pid in children.stdout.split()  # not multiprocessing's resource tracker
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, children.stdout
        for _ in range(20):  # a new connection each time, so the kernel spreads them over the workers
            response = httpx.post(proxy.base_url + "/chat/completions",
                                  json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200 and response.headers["x-bpo-reason"] == "disabled"
        metrics = httpx.get(proxy.url + "/metrics").text
    finally:
        proxy.stop()
    from prometheus_client.parser import text_string_to_metric_families

    totals = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name == "bpo_requests_total"]
    assert sum(totals) == 20
    writers = {p.name.rsplit("_", 1)[-1].removesuffix(".db") for p in tmp_path.glob("*.db")}
    assert writers and writers <= set(workers)  # samples come from the workers' files, merged on scrape


def test_litellm_lines_are_json_and_never_hold_the_prompt(tmp_path: Path) -> None:
    config = tmp_path / "bpo.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: claude\n"
        f"    litellm_params: {{model: anthropic/claude-test, api_base: 'http://127.0.0.1:{free_port()}',"
        " api_key: sk-route-secret-7}\n")
    proxy = ProxyProcess(["--config", str(config), "--optimizer", "none", "--log-level", "debug"]).start()
    try:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError):  # the provider is unreachable: a 502, logged by litellm too
            client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Tell a secret"}])
    finally:
        output = proxy.stop()
    lines = output.splitlines()
    assert lines and all(line.startswith("{") and json.loads(line) for line in lines), output[:2000]
    assert "Tell a secret" not in output and "sk-route-secret-7" not in output


SERVE_IMPORTS = """
import sys
from starlette.testclient import TestClient
from proxy.cli import build_parser
from proxy.app import create_app
from proxy.settings import load_settings

build_parser("serve").parse_args(["serve"])
with TestClient(create_app(load_settings({"optimizer": "none"}))) as client:
    assert client.get("/readyz").status_code == 200
print(sorted(name for name in sys.modules if name.split(".")[0] in ("training", "matplotlib", "torch")))
"""


def test_bpo_serve_imports_no_training_module(tmp_path: Path) -> None:
    """proxy -> optimizer only: the gateway's process loads neither the training package nor its heavy deps."""
    env = {**os.environ, "BPO_KEY_STORE": f"sqlite:{tmp_path / 'keys.db'}"}
    result = subprocess.run([sys.executable, "-c", SERVE_IMPORTS], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_full_parser_still_has_every_command() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"serve", "rewrite", "train", "eval", "data", "ab"} <= set(commands)
