"""The one settings object: flags beat ``BPO_*`` environment variables, which beat ``--config`` YAML."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optimizer.reasons import SKIP_RULE_NAMES
from proxy.keys import ClientKey, KeySpecError, config_key

ENV_PREFIX = "BPO_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CLIENT_AUTH_MODES = ("on", "off", "auto")
# The skip policy's rules (proxy/skip.py holds what each one checks).
LITELLM_SECTIONS = frozenset({"model_list", "litellm_settings", "general_settings", "router_settings",
                              "environment_variables"})


class SettingsError(ValueError):
    """A setting is missing, malformed or contradicts another; the message names it."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ModelRoute:
    """One LiteLLM-style ``model_list`` entry: the public name and the litellm params behind it."""

    model_name: str
    litellm_params: Mapping[str, Any]
    model_info: Mapping[str, Any] = field(default_factory=dict)  # prices for budgets, as in LiteLLM
    skip_rules: tuple[str, ...] | None = None  # bpo_skip_rules: this model's skip policy (None: the default)

    @property
    def provider_model(self) -> str:
        return str(self.litellm_params["model"])


@dataclass(frozen=True)
class Settings:
    """Everything ``bpo serve`` can be told. Each field is a flag ``--name-with-dashes`` and ``BPO_NAME``."""

    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    config: str | None = _opt(None, "YAML config file (LiteLLM-style model_list and any setting below)")
    upstream_base_url: str | None = _opt(
        None, "OpenAI-compatible upstream, e.g. https://api.openai.com/v1 (used for models not in model_list)"
    )
    upstream_api_key: str | None = _opt(
        None, "key sent upstream instead of the client's Authorization (default: forward the client's)"
    )
    upstream_timeout: float = _opt(600.0, "seconds: the deadline of a plain answer (else 504), and the longest "
                                       "silence inside a stream (else it ends with an error event)")
    anthropic_base_url: str = _opt(
        "https://api.anthropic.com", "Anthropic Messages API upstream of /v1/messages for models not in model_list")
    optimizer: str = _opt("hf:THUDM/BPO", "optimizer spec: none | hf:PATH_OR_HUB_ID | remote:BASE_URL | llm:MODEL")
    optimizer_timeout: float = _opt(3.0, "deadline in seconds for one rewrite; past it the original is sent")
    optimizer_max_new_tokens: int = _opt(
        1024, "cap on a rewrite's tokens; each rewrite's budget is 6x its prompt (at least 128) up to this")
    optimizer_max_batch_size: int = _opt(
        0, "most prompts generated together in one batch; 0 = by device: 1 on CPU, 8 on a GPU (bench/README.md)")
    optimizer_max_wait_ms: float = _opt(5.0, "longest a prompt waits for its batch to fill, in ms")
    optimizer_seed: int | None = _opt(None, "seed for reproducible rewrites")
    optimizer_device: str | None = _opt(None, "torch device for hf: (default: cuda, then mps, then cpu)")
    optimizer_model: str | None = _opt(None, "model name on a remote: server (default: its first /v1/models)")
    optimizer_api_key: str | None = _opt(None, "API key for a remote: or llm: optimizer")
    require_optimizer: bool = _opt(False, "fail start-up when the optimizer cannot load, instead of passing through")
    mode: str = _opt("stable", "default rewrite mode: stable | aggressive", choices=("stable", "aggressive"))
    optimize_by_default: bool = _opt(True, "rewrite prompts when neither X-BPO nor an A/B split decides")
    rewrite_history: str = _opt(
        "on", "on: earlier user turns that were rewritten are sent as that cached rewrite again (never a new "
        "optimizer call), so the model sees the conversation it answered and prompt caches keep their prefix",
        choices=("on", "off"))
    skip_rules: str = _opt(
        "json-schema,code-or-data,unsupported-language",
        "requests not rewritten, comma-separated rule names (none: rewrite every user turn); a model_list "
        "entry's bpo_skip_rules overrides it for that model")
    optimizer_languages: str = _opt(
        "en", "languages the optimizer was trained on (en, fr, de, es, it, pt, nl, cjk, cyrillic, ...); a "
        "prompt clearly in another is not rewritten (rule unsupported-language)")
    max_prompt_chars: int = _opt(8000, "a user turn with more text (all parts) is forwarded unchanged (too-long)")
    max_body_bytes: int = _opt(10 * 1024 * 1024, "largest request body accepted, in bytes (413 above)")
    max_header_bytes: int = _opt(64 * 1024, "largest request line plus headers accepted, in bytes (431 above)")
    header_timeout: float = _opt(10.0, "seconds a client has to send a request's line and headers (408 past it)")
    body_timeout: float = _opt(60.0, "seconds a client has to send a request's whole body once its headers are "
                                     "in (408 past it); raise it for large uploads over slow links")
    max_connections: int = _opt(1000, "open client connections per worker process; past it a new connection is "
                                      "answered 503 and closed")
    keep_alive_timeout: float = _opt(5.0, "seconds an idle keep-alive client connection stays open")
    keep_alive_max_requests: int = _opt(1000, "requests served on one client connection before it is closed")
    cache: str = _opt("memory", "rewrite cache: memory | redis://HOST:PORT/DB | none")
    cache_ttl_seconds: int = _opt(7 * 24 * 3600, "how long a cached rewrite lives")
    cache_namespace: str = _opt("bpo", "key prefix, so deployments can share one Redis")
    cache_max_entries: int = _opt(10_000, "in-process cache size, in entries")
    cache_max_bytes: int = _opt(64 * 1024 * 1024, "in-process cache size, in bytes")
    cache_per_tenant: bool = _opt(False, "scope cached rewrites per API key, so tenants never share them")
    ab_treatment_percent: float | None = _opt(None, "percent of sticky users in the treatment arm (0-100)")
    ab_salt: str = _opt("bpo", "salt of the arm hash; keep it to keep users in their arm")
    ab_experiment: str = _opt("default", "experiment name recorded with every event")
    events: str = _opt("none", "events sink: jsonl:PATH | redis://HOST:PORT/DB | none")
    events_include_text: bool = _opt(False, "record prompt texts in events (off: never)")
    shadow_judge_model: str | None = _opt(None, "litellm model that judges treatment vs control off the request path")
    shadow_judge_base_url: str | None = _opt(None, "OpenAI-compatible base URL for the shadow judge")
    shadow_judge_api_key: str | None = _opt(
        None, "API key for the shadow judge (default: litellm's provider variable, e.g. OPENAI_API_KEY)")
    shadow_rate: float = _opt(0.05, "fraction of treatment requests judged in the shadow")
    shadow_max_per_minute: int = _opt(60, "most shadow judgements started per minute")
    admin_key: str | None = _opt(None, "bearer key for /admin/* (admin endpoints are off without it)")
    otel_endpoint: str | None = _opt(None, "OTLP/HTTP endpoint for OpenTelemetry traces (default: "
                                           "$OTEL_EXPORTER_OTLP_ENDPOINT; off when unset; needs the [otel] extra)")
    workers: int = _opt(1, "worker processes; each is a whole gateway, so share --cache redis:// and use a "
                           "remote: optimizer with several (metrics are merged across them)")
    log_level: str = _opt("info", "log level: debug | info | warning | error", choices=LOG_LEVELS)
    access_log: bool = _opt(True, "one JSON line per chat completion (at log level info or below)")
    key_store: str = _opt("sqlite:bpo-keys.db", "where client keys and spend live: sqlite:PATH | redis://HOST:PORT/DB")
    client_auth: str = _opt("auto", "client keys on /v1/*: on | off | auto (on once any client key exists)",
                            choices=CLIENT_AUTH_MODES)
    allow_unauthenticated: bool = _opt(
        False, "start even when binding a non-loopback address with a provider key and client auth off")
    key_cache_seconds: float = _opt(
        10.0, "how long a key lookup is cached: a key revoked on another replica works up to this long")
    budget_default_max_tokens: int = _opt(
        4096, "output tokens reserved against a key's budget when a request sets no max_tokens")
    model_list: tuple[ModelRoute, ...] = field(
        default=(), metadata={"help": "LiteLLM-style routes (config file only)", "config_only": True}
    )
    keys: tuple[ClientKey, ...] = field(
        default=(), metadata={"help": "client keys (config file only; key or key_hash)", "config_only": True}
    )

    def route_for(self, model: str) -> ModelRoute | None:
        return next((route for route in self.model_list if route.model_name == model), None)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(name: str) -> Any:
    hint = typing.get_type_hints(Settings)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _field_type(name)
    if value is None or kind is tuple or typing.get_origin(kind) is tuple:
        return value
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is str and isinstance(value, bool) and "on" in FIELDS[name].metadata.get("choices", ()):
            return "on" if value else "off"  # YAML 1.1 reads an unquoted on / off as a boolean
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {value!r} is not a valid {kind.__name__}") from exc


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults stay unset so env and config can fill them.

    (``training.cli.add_config_arguments`` is the stages' counterpart, with real defaults and types.)
    """
    for name, spec in FIELDS.items():
        if spec.metadata.get("config_only"):
            continue
        help_text = f"{spec.metadata['help']} [env {env_name(name)}; default {spec.default!r}]"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if _field_type(name) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        parser.add_argument(flag_name(name), **kwargs)


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge defaults < config YAML < environment < flags, then validate."""
    flags = {k: v for k, v in (flags or {}).items()
             if v is not None and k in FIELDS and not FIELDS[k].metadata.get("config_only")}
    environ = os.environ if environ is None else environ
    env_values = {n: _coerce(n, environ[env_name(n)], env_name(n)) for n, f in FIELDS.items()
                  if env_name(n) in environ and not f.metadata.get("config_only")}
    config_path = flags.get("config") or env_values.get("config")
    values: dict[str, Any] = _read_config(Path(config_path), environ) if config_path else {}
    values.update(env_values)
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and environ.get("OTEL_SDK_DISABLED", "").lower() != "true":
        values.setdefault("otel_endpoint", environ["OTEL_EXPORTER_OTLP_ENDPOINT"])  # the standard variable
    values.update({n: _coerce(n, v, flag_name(n)) for n, v in flags.items()})
    settings = Settings(**values)
    validate(settings)
    return settings


def _read_config(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise SettingsError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"--config: {path} must hold a mapping")
    # A LiteLLM proxy config loads as it is: its sections are read (model_list) or left to litellm.
    stray = sorted(set(raw) - set(FIELDS) - LITELLM_SECTIONS - {"bpo_settings"})
    if stray:
        raise SettingsError(f"--config: unknown key(s) {', '.join(stray)} in {path}")
    values = dict(raw.get("bpo_settings") or {})
    values.update({k: v for k, v in raw.items() if k in FIELDS and k not in ("model_list", "keys")})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise SettingsError(f"--config: unknown setting(s) {', '.join(unknown)} in {path}")
    values = {k: _coerce(k, v, f"{path}: {k}") for k, v in values.items()}
    values["model_list"] = _parse_model_list(raw.get("model_list") or [], path, environ)
    values["keys"] = _parse_keys(raw.get("keys") or [], path)
    return values


def _parse_keys(entries: Any, path: Path) -> tuple[ClientKey, ...]:
    if not isinstance(entries, list):
        raise SettingsError(f"--config: {path}: keys must be a list")
    try:
        keys = tuple(config_key(entry, index) for index, entry in enumerate(entries))
    except KeySpecError as exc:
        raise SettingsError(f"--config: {path}: {exc}") from exc
    names = [key.name for key in keys]
    if len(set(names)) != len(names) or len({key.key_hash for key in keys}) != len(keys):
        raise SettingsError(f"--config: {path}: keys need distinct names and distinct keys")
    return keys


def _parse_model_list(entries: Sequence[Any], path: Path, environ: Mapping[str, str]) -> tuple[ModelRoute, ...]:
    routes = []
    for index, entry in enumerate(entries):
        where = f"--config: {path}: model_list[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
            raise SettingsError(f"{where} needs a model_name")
        params = entry.get("litellm_params")
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            raise SettingsError(f"{where} needs litellm_params.model")
        if params["model"].startswith("azure/") and not params.get("api_base"):
            raise SettingsError(f"{where}: an azure/ model needs litellm_params.api_base")
        info = entry.get("model_info") or {}
        if not isinstance(info, dict):
            raise SettingsError(f"{where}.model_info must be a mapping")
        skip = entry.get("bpo_skip_rules")
        if skip is not None and not (isinstance(skip, list) and all(isinstance(r, str) for r in skip)):
            raise SettingsError(f"{where}.bpo_skip_rules must be a list of rule names")
        routes.append(ModelRoute(entry["model_name"], _resolve_env_refs(params, environ, where), info,
                                 None if skip is None else tuple(skip)))
    return tuple(routes)


def _resolve_env_refs(params: Mapping[str, Any], environ: Mapping[str, str], where: str) -> dict[str, Any]:
    """LiteLLM's ``os.environ/NAME`` convention keeps keys out of config files; an unset NAME is an error,
    never an empty key (which would let the client's own key reach this provider)."""
    resolved = {}
    for key, value in params.items():
        if isinstance(value, str) and value.startswith("os.environ/"):
            name = value.removeprefix("os.environ/")
            if not environ.get(name):
                raise SettingsError(f"{where}.litellm_params.{key}: environment variable {name} is not set")
            value = environ[name]
        resolved[key] = value
    return resolved


def export_environment(settings: Settings, environ: MutableMapping[str, str]) -> None:
    """Write every setting as its ``BPO_*`` variable, so worker processes load exactly these settings."""
    for name, spec in FIELDS.items():
        value = getattr(settings, name)
        if spec.metadata.get("config_only") or value is None:
            continue
        environ[env_name(name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)


def validate(settings: Settings) -> None:
    checks = [
        (0 <= settings.port <= 65535, "port", "must be between 0 and 65535 (0: any free port)"),
        (settings.optimizer_timeout > 0, "optimizer_timeout", "must be positive"),
        (settings.upstream_timeout > 0, "upstream_timeout", "must be positive"),
        (settings.max_prompt_chars > 0, "max_prompt_chars", "must be positive"),
        (settings.max_body_bytes > 0, "max_body_bytes", "must be positive"),
        (settings.max_header_bytes >= 1024, "max_header_bytes", "must be at least 1024"),
        (settings.header_timeout > 0, "header_timeout", "must be positive"),
        (settings.body_timeout > 0, "body_timeout", "must be positive"),
        (settings.max_connections >= 1, "max_connections", "must be at least 1"),
        (settings.keep_alive_timeout > 0, "keep_alive_timeout", "must be positive"),
        (settings.keep_alive_max_requests >= 1, "keep_alive_max_requests", "must be at least 1"),
        (settings.optimizer_max_batch_size >= 0, "optimizer_max_batch_size", "must be 0 (by device) or more"),
        (settings.workers >= 1, "workers", "must be at least 1"),
        (settings.optimizer_max_new_tokens >= 1, "optimizer_max_new_tokens", "must be at least 1"),
        (settings.optimizer_max_wait_ms >= 0, "optimizer_max_wait_ms", "must not be negative"),
        (settings.cache_ttl_seconds >= 1, "cache_ttl_seconds", "must be at least 1"),
        (settings.cache_max_entries >= 0, "cache_max_entries", "must not be negative (0: no in-process tier)"),
        (settings.cache_max_bytes >= 0, "cache_max_bytes", "must not be negative"),
        (settings.shadow_max_per_minute >= 0, "shadow_max_per_minute", "must not be negative"),
        (settings.log_level.lower() in LOG_LEVELS, "log_level", "must be one of " + ", ".join(LOG_LEVELS)),
        (settings.mode in ("stable", "aggressive"), "mode", "must be stable or aggressive"),
        (settings.rewrite_history in ("on", "off"), "rewrite_history", "must be on or off"),
        (_names_ok(settings.skip_rules), "skip_rules", "must name rules among " + ", ".join(SKIP_RULE_NAMES)),
        (0 <= settings.shadow_rate <= 1, "shadow_rate", "must be between 0 and 1"),
        (_spec_ok(settings.optimizer, ("none", "hf:", "remote:", "llm:")), "optimizer",
         "must be none, hf:PATH, remote:URL or llm:MODEL"),
        (_spec_ok(settings.cache, ("memory", "none", "redis://", "rediss://", "unix://")), "cache",
         "must be memory, none or redis://HOST:PORT/DB"),
        (_spec_ok(settings.events, ("none", "jsonl:", "redis://", "rediss://")), "events",
         "must be none, jsonl:PATH or redis://HOST:PORT/DB"),
        (_spec_ok(settings.key_store, ("sqlite:", "redis://", "rediss://", "unix://")), "key_store",
         "must be sqlite:PATH or redis://HOST:PORT/DB"),
        (settings.client_auth in CLIENT_AUTH_MODES, "client_auth", "must be on, off or auto"),
        (settings.key_cache_seconds >= 0, "key_cache_seconds", "must not be negative"),
        (settings.budget_default_max_tokens >= 1, "budget_default_max_tokens", "must be at least 1"),
    ]
    for route in settings.model_list:
        if route.skip_rules is not None and not _names_ok(",".join(route.skip_rules) or "none"):
            raise SettingsError(f"model_list {route.model_name!r}: bpo_skip_rules must name rules among "
                                + ", ".join(SKIP_RULE_NAMES))
    if settings.ab_treatment_percent is not None:
        checks.append((0 <= settings.ab_treatment_percent <= 100, "ab_treatment_percent", "must be 0-100"))
    for ok, name, problem in checks:
        if not ok:
            value = getattr(settings, name)
            raise SettingsError(f"{flag_name(name)} / {env_name(name)} = {value!r}: {problem}")


def skip_rule_names(spec: str) -> tuple[str, ...]:
    """The rule names of a ``--skip-rules`` value (``none``: no rule)."""
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    return () if names == ("none",) else names


def _names_ok(spec: str) -> bool:
    return all(name in SKIP_RULE_NAMES for name in skip_rule_names(spec))


def _spec_ok(spec: str, prefixes: Sequence[str]) -> bool:
    return any(spec == p or (p.endswith((":", "//")) and spec.startswith(p) and len(spec) > len(p))
               for p in prefixes)
