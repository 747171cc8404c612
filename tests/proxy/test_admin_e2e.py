"""POST /admin/optimizer/reload on the real gateway: auth, errors in OpenAI's shape, a live model swap."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest

from optimizer.manifest import Manifest, write_manifest
from tests.fakes.proxy_server import RunningProxy
from tests.proxy.conftest import StartProxy

ADMIN = {"Authorization": "Bearer admin-secret"}


def reload(proxy: RunningProxy, body: object = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/admin/optimizer/reload", json=body, headers=ADMIN if headers is None else headers, timeout=60
    )


def chat_identity(proxy: RunningProxy) -> str:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "Tell me about black holes."}]
    )
    return raw.headers["x-bpo-optimizer"]


@pytest.fixture
def admin_proxy(start_proxy: StartProxy) -> RunningProxy:
    return start_proxy(admin_key="admin-secret")


def test_admin_routes_are_absent_without_an_admin_key(proxy: RunningProxy) -> None:
    assert reload(proxy).status_code == 404


@pytest.mark.parametrize(
    ("headers", "status", "error_type"),
    [
        ({}, 401, "authentication_error"),
        ({"Authorization": "Basic admin-secret"}, 401, "authentication_error"),
        ({"Authorization": "Bearer wrong"}, 403, "permission_error"),
    ],
)
def test_reload_requires_the_admin_key(
    admin_proxy: RunningProxy, headers: dict[str, str], status: int, error_type: str
) -> None:
    response = reload(admin_proxy, {"optimizer": "none"}, headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == error_type and set(error) == {"message", "type", "param", "code"}
    assert chat_identity(admin_proxy).startswith("remote:")


def test_bad_bodies_and_specs_are_400(admin_proxy: RunningProxy) -> None:
    bad_json = httpx.post(f"{admin_proxy.url}/admin/optimizer/reload", content=b"{nope", headers=ADMIN)
    assert bad_json.status_code == 400
    assert reload(admin_proxy, {"optimizer": 5}).json()["error"]["param"] == "optimizer"
    unknown = reload(admin_proxy, {"optimizer": "bogus:thing"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_optimizer"


def test_unloadable_model_is_422_and_the_old_optimizer_keeps_serving(admin_proxy: RunningProxy, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    before = chat_identity(admin_proxy)
    response = reload(admin_proxy, {"optimizer": f"hf:{broken}"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "optimizer_load_failed"
    assert f"still serving {before}" in response.json()["error"]["message"]
    assert chat_identity(admin_proxy) == before


def test_reload_swaps_to_a_new_model_live(admin_proxy: RunningProxy, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "bpo-v7"))
    write_manifest(
        model_dir,
        Manifest(
            name="bpo-tiny",
            version="7",
            base_model="tiny",
            data_sha256="0" * 64,
            template_version="1",
            created="2026-01-01T00:00:00Z",
        ),
    )
    before = chat_identity(admin_proxy)
    assert before.startswith("remote:")
    response = reload(admin_proxy, {"optimizer": f"hf:{model_dir}"})
    assert response.status_code == 200, response.text
    assert response.json() | {"detail": ""} == {
        "optimizer": "hf:bpo-tiny@7",
        "previous": before,
        "spec": f"hf:{model_dir}",
        "state": "ready",
        "detail": "",
    }
    assert chat_identity(admin_proxy) == "hf:bpo-tiny@7"
    ready = httpx.get(f"{admin_proxy.url}/readyz").json()
    assert ready["optimizer"]["name"] == "hf:bpo-tiny@7"
    # An empty body reloads the same spec again (e.g. after new weights were written in place).
    assert reload(admin_proxy).json()["optimizer"] == "hf:bpo-tiny@7"
