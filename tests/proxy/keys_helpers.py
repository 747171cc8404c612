"""Helpers for the client-key tests: the admin API, a priced route, and a provider that bills the worst case."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fakes.upstream import Recorded, Reply

ADMIN_KEY = "admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRICED_MODEL = "priced-model"
# Output dominates: a request with max_tokens=1000 costs ~$1.00 (its prompt adds ~$0.0003).
INPUT_PRICE, OUTPUT_PRICE = 1e-6, 1e-3


def create_key(url: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("name", f"team-{time.monotonic_ns() % 10**9}")
    response = httpx.post(f"{url}/admin/keys", json=spec, headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def list_keys(url: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/admin/keys", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def spend_of(url: str, key_id: str) -> float:
    return float(next(k for k in list_keys(url) if k["id"] == key_id)["spend_usd"])


def settled_spend(url: str, key_id: str, at_least: float, timeout: float = 30.0) -> float:
    """The key's spend once the settler has written at least ``at_least`` (it writes within SETTLE_INTERVAL)."""
    deadline = time.monotonic() + timeout
    spend = spend_of(url, key_id)
    while spend < at_least - 1e-9 and time.monotonic() < deadline:
        time.sleep(0.1)
        spend = spend_of(url, key_id)
    return spend


def priced_config(path: Path, upstream_base_url: str, keys: list[dict[str, Any]] | None = None) -> str:
    """A config with one priced route to the fake provider (and optionally config keys)."""
    config: dict[str, Any] = {"model_list": [{
        "model_name": PRICED_MODEL,
        "litellm_params": {"model": "openai/fake-model", "api_base": upstream_base_url},
        "model_info": {"input_cost_per_token": INPUT_PRICE, "output_cost_per_token": OUTPUT_PRICE},
    }]}
    if keys:
        config["keys"] = keys
    path.write_text(yaml.safe_dump(config))
    return str(path)


def worst_case_billing(delay: float = 0.0) -> Any:
    """A provider that bills every request its worst case: each body byte a prompt token, max_tokens out."""

    def respond(recorded: Recorded) -> Reply:
        body = recorded.json
        completion = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": len(recorded.body), "completion_tokens": completion,
                 "total_tokens": len(recorded.body) + completion}
        return Reply(json={"id": "chatcmpl-bill", "object": "chat.completion", "created": 1, "model": "fake-model",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                        "finish_reason": "length", "logprobs": None}],
                           "usage": usage}, delay=delay)

    return respond


def request_cost(max_tokens: int = 1000, body_bytes: int = 300) -> float:
    """About what ``worst_case_billing`` charges one small request."""
    return body_bytes * INPUT_PRICE + max_tokens * OUTPUT_PRICE
