"""Settings: flags beat BPO_* variables, which beat --config YAML, which beats defaults."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from proxy.settings import FIELDS, SettingsError, add_arguments, env_name, flag_name, load_settings


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bpo.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_precedence_flag_over_env_over_config_over_default(tmp_path: Path) -> None:
    config = write(tmp_path, """
        port: 7000
        optimizer_timeout: 1.5
        cache: none
    """)
    settings = load_settings({"config": config, "port": "9000"},
                             {"BPO_PORT": "8000", "BPO_OPTIMIZER_TIMEOUT": "2.5"})
    assert settings.port == 9000
    assert settings.optimizer_timeout == 2.5
    assert settings.cache == "none"
    assert settings.host == "127.0.0.1"


def test_config_path_can_come_from_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path, "ab_treatment_percent: 25\n")
    assert load_settings({}, {"BPO_CONFIG": config}).ab_treatment_percent == 25.0


def test_litellm_model_list_is_read_and_env_references_resolved(tmp_path: Path) -> None:
    config = write(tmp_path, """
        model_list:
          - model_name: claude
            litellm_params:
              model: anthropic/claude-3-5-sonnet
              api_key: os.environ/MY_ANTHROPIC_KEY
          - model_name: gpt
            litellm_params: {model: openai/gpt-4o-mini}
        litellm_settings:
          drop_params: true
        bpo_settings:
          cache: none
    """)
    settings = load_settings({"config": config}, {"MY_ANTHROPIC_KEY": "sk-ant-test"})
    assert [r.model_name for r in settings.model_list] == ["claude", "gpt"]
    route = settings.route_for("claude")
    assert route is not None and route.litellm_params["api_key"] == "sk-ant-test"
    assert settings.cache == "none"


@pytest.mark.parametrize(("flags", "env", "needle"), [
    ({"port": "70000"}, {}, "--port / BPO_PORT"),
    ({}, {"BPO_PORT": "eighty"}, "BPO_PORT"),
    ({"optimizer": "gpt4"}, {}, "--optimizer"),
    ({"cache": "memcached://x"}, {}, "--cache"),
    ({"events": "kafka:x"}, {}, "--events"),
    ({"ab_treatment_percent": "150"}, {}, "--ab-treatment-percent"),
    ({}, {"BPO_REQUIRE_OPTIMIZER": "maybe"}, "BPO_REQUIRE_OPTIMIZER"),
    ({}, {"BPO_LOG_LEVEL": "loud"}, "BPO_LOG_LEVEL"),
    ({"cache_ttl_seconds": "-5"}, {}, "--cache-ttl-seconds"),
    ({"optimizer_max_new_tokens": "0"}, {}, "--optimizer-max-new-tokens"),
    ({"cache_max_bytes": "-1"}, {}, "--cache-max-bytes"),
])
def test_bad_settings_fail_with_a_message_naming_them(flags: dict[str, str], env: dict[str, str],
                                                      needle: str) -> None:
    with pytest.raises(SettingsError, match=needle.replace("-", r"\-").replace("/", r"/")):
        load_settings(flags, env)


@pytest.mark.parametrize(("text", "needle"), [
    ("model_list:\n  - model_name: x\n", "needs litellm_params.model"),
    ("nonsense_key: 1\n", "unknown key"),
    ("- a list\n", "mapping"),
    (":\n  bad: [", "not valid YAML"),
    ("model_list:\n  - model_name: a\n    litellm_params: {model: azure/dep}\n", "needs litellm_params.api_base"),
    ("model_list:\n  - model_name: c\n    litellm_params: {model: anthropic/x, api_key: os.environ/NOPE}\n",
     "NOPE is not set"),
])
def test_bad_config_files_are_rejected(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SettingsError, match="--config") as caught:
        load_settings({"config": write(tmp_path, text)}, {})
    assert needle in str(caught.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"config": str(tmp_path / "nope.yaml")}, {})


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for name, spec in FIELDS.items():
        if spec.metadata.get("config_only"):
            continue
        assert flag_name(name) in help_text
        assert env_name(name) in help_text
    args = parser.parse_args(["--ab-treatment-percent", "10", "--no-optimize-by-default"])
    settings = load_settings(vars(args), {})
    assert settings.ab_treatment_percent == 10.0 and settings.optimize_by_default is False
