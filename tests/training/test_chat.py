"""The chat client's choices that no end-to-end test pins down: what is retried, which key is sent."""

from __future__ import annotations

import pytest

from training.chat import ChatModel, is_retryable


class StatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"status {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize(("error", "retry"), [
    (StatusError(429), True), (StatusError(500), True), (StatusError(503), True), (StatusError(408), True),
    (StatusError(400), False), (StatusError(401), False), (StatusError(404), False),
    (TimeoutError(), True), (ConnectionError(), True), (ValueError("bad"), False),
])
def test_only_transient_failures_are_retried(error: Exception, retry: bool) -> None:
    assert is_retryable(error) is retry


def test_a_base_url_means_litellm_openai_provider_with_a_placeholder_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = ChatModel("llama-3-70b", base_url="http://127.0.0.1:8000/v1")
    assert local.litellm_model == "openai/llama-3-70b" and local.resolved_api_key() == "EMPTY"
    assert ChatModel("openai/x", base_url="http://h/v1").litellm_model == "openai/x"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert local.resolved_api_key() == "sk-env"
    assert ChatModel("m", base_url="http://h/v1", api_key="sk-flag").resolved_api_key() == "sk-flag"
    hosted = ChatModel("anthropic/claude-3-5-sonnet")
    assert hosted.litellm_model == "anthropic/claude-3-5-sonnet" and hosted.resolved_api_key() is None
