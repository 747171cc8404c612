"""The skip policy's rule table, and its reasons end to end."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from proxy import skip
from proxy.settings import SettingsError
from proxy.skip import Candidate, SkipPolicy, mostly_code_or_data
from tests.fakes.proxy_server import make_settings
from tests.fakes.upstream import FakeUpstream

from .conftest import StartProxy


@pytest.mark.parametrize(("text", "expected"), [
    ("def f(x):\n    return x + 1\n\nprint(f(2))", True),
    ('{"a": 1, "b": [1, 2]}', True),
    ("name,age,city\nbob,3,paris\nann,4,rome", True),
    ("Tell me about llamas", False),
    ("Write a poem.\nAbout the sea.\nMake it rhyme.", False),
    ("Fix this bug please:\n```\nx = 1\n```", True),  # the fence lines count as code
    ("Fix this bug, it crashes.\nThe log says nothing.\nI tried twice.\n```\nx = 1\n```", False),
])
def test_mostly_code_or_data(text: str, expected: bool) -> None:
    assert mostly_code_or_data(text) is expected


def test_the_check_stays_linear_on_hostile_lines() -> None:
    started = time.perf_counter()
    mostly_code_or_data("a" * 8000 + "(")
    mostly_code_or_data(("x" * 50 + ",\n") * 200)
    assert time.perf_counter() - started < 2.0  # quadratic would take minutes; generous for busy machines


def test_rules_apply_in_order_and_per_model_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "coder", "bpo_skip_rules": [],
                                                      "litellm_params": {"model": "openai/x"}}]}))
    policy = SkipPolicy(make_settings(config=str(config)))
    chinese = Candidate("请帮我写一首关于春天的诗", json_schema=True)
    assert policy.first_match(chinese, "gpt") == "json-schema"
    assert policy.first_match(Candidate("请帮我写一首关于春天的诗", False), "gpt") == "unsupported-language"
    assert policy.first_match(chinese, "coder") is None  # the route turned every rule off
    assert policy.first_match(chinese, "gpt", key_rules=("unsupported-language",)) == "unsupported-language"
    assert SkipPolicy(make_settings(skip_rules="none")).first_match(chinese, "gpt") is None
    assert SkipPolicy(make_settings(optimizer_languages="en,cjk")).first_match(
        Candidate("请帮我写一首关于春天的诗", False), "gpt") is None


def test_unknown_rule_names_stop_the_start() -> None:
    with pytest.raises(SettingsError, match="skip-rules"):
        make_settings(skip_rules="json-schema,nonsense")


def test_skipped_requests_say_why(upstream: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy()
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    cases = [("请帮我写一首关于春天的诗", None, "unsupported-language"),
             ("def f(x):\n    return x + 1\n\nprint(f(2))", None, "code-or-data"),
             ("List three rivers", {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
              "json-schema")]
    for text, response_format, reason in cases:
        extra = {"response_format": response_format} if response_format else {}
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": text}], **extra)  # type: ignore[call-overload]
        assert raw.headers["x-bpo-applied"] == "false" and raw.headers["x-bpo-reason"] == reason
        assert upstream.requests_to("/v1/chat/completions")[-1].json["messages"][0]["content"] == text
    assert upstream.requests_to("/v1/completions") == []  # no optimizer call for a skipped request
    assert 'reason="code-or-data",route="chat"' in httpx.get(proxy.url + "/metrics").text


def test_decisions_are_remembered_per_rules_and_prompt_and_stay_bounded() -> None:
    policy = SkipPolicy(make_settings())
    schema = Candidate("List three rivers of Europe.", json_schema=True)
    assert policy.first_match(schema, "gpt") == "json-schema"
    assert policy.first_match(schema, "gpt", key_rules=()) is None  # a key's own rules are part of the memo
    assert policy.first_match(schema, "gpt") == "json-schema"
    assert policy.first_match(Candidate("List three rivers of Europe.", json_schema=False), "gpt") is None
    for index in range(skip.MAX_REMEMBERED_DECISIONS + 10):
        policy.first_match(Candidate(f"prompt number {index}", json_schema=False), "gpt")
    assert len(policy._decided) <= skip.MAX_REMEMBERED_DECISIONS
