"""The start-up check that refuses an open relay: a public port that spends held provider keys for anyone."""

from __future__ import annotations

import ipaddress

from proxy.keystore import KeyStoreError, count_keys_now
from proxy.settings import ModelRoute, Settings

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
# litellm_params that carry a credential: the route spends a key the gateway holds.
CREDENTIAL_PARAMS = ("api_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                     "vertex_credentials", "azure_ad_token")
# Providers whose routes reach the fast path; any other provider goes through litellm, which reads the
# provider's key from the environment (ANTHROPIC_API_KEY, ...): a key the gateway holds.
OPENAI_WIRE = frozenset({"openai", "hosted_vllm", "openai_like", "custom_openai", "vllm", "azure"})


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def holds_provider_key(settings: Settings) -> bool:
    return bool(settings.upstream_api_key) or any(_route_holds_key(route) for route in settings.model_list)


def _route_holds_key(route: ModelRoute) -> bool:
    params = route.litellm_params
    provider, _, rest = str(params.get("model", "")).partition("/")
    provider = str(params.get("custom_llm_provider") or (provider if rest else "openai"))
    return any(params.get(name) for name in CREDENTIAL_PARAMS) or provider not in OPENAI_WIRE


def client_auth_off(settings: Settings) -> bool:
    """Off, or auto with no key anywhere (config or store): every request would be accepted."""
    if settings.client_auth != "auto":
        return settings.client_auth == "off"
    if settings.keys:
        return False
    try:
        return count_keys_now(settings.key_store, settings.cache_namespace) == 0
    except KeyStoreError:
        return False  # the gateway fails closed on a store it cannot read: no request is accepted


def open_relay_problem(settings: Settings) -> str | None:
    """The one line ``bpo serve`` prints before refusing to start, or None when the start is safe."""
    if settings.allow_unauthenticated or is_loopback(settings.host):
        return None
    if not holds_provider_key(settings) or not client_auth_off(settings):
        return None
    return (f"refusing to start an open relay: {settings.host} is not a loopback address, a provider key is "
            "configured and client auth is off, so anyone who reaches the port spends that key. Create client "
            "keys (config keys: or POST /admin/keys with --client-auth on), bind 127.0.0.1, or pass "
            "--allow-unauthenticated.")
