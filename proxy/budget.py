"""What a request costs: model prices, the worst case reserved before forwarding, the actual cost after.

Prices come from a route's ``model_info`` (``input_cost_per_token``, ``output_cost_per_token``, as in
LiteLLM's config), else from litellm's bundled cost map, read as a file (importing litellm costs seconds
and, without ``LITELLM_LOCAL_MODEL_COST_MAP``, a download).

The worst case of a chat request: every byte of the body it sends upstream counted as an input token (a
token covers at least one byte, so this bounds the prompt from above), plus ``max_completion_tokens`` /
``max_tokens``, or ``--budget-default-max-tokens`` when the request sets neither. A request that asks for
more output than that default without saying so may cost more than was reserved: the budget then
overshoots by at most that request.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.settings import Settings

log = logging.getLogger("bpo.budget")

COST_MAP_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True)
class Price:
    """USD per token."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input + completion_tokens * self.output


@functools.cache
def litellm_cost_map() -> Mapping[str, Any]:
    """litellm's bundled cost map, read without importing litellm; empty when litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / COST_MAP_FILE
    try:
        loaded = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("cannot read litellm's cost map %s: %s", path, exc)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _price_of(info: Any) -> Price | None:
    if not isinstance(info, Mapping):
        return None
    prices = [info.get("input_cost_per_token"), info.get("output_cost_per_token")]
    numbers = [float(p) for p in prices if isinstance(p, int | float) and not isinstance(p, bool) and p >= 0]
    return Price(numbers[0], numbers[1]) if len(numbers) == 2 else None


class Pricing:
    """Prices per public model name, remembered: the settings and the cost map never change while serving."""

    def __init__(self, settings: Settings,
                 load_cost_map: Callable[[], Mapping[str, Any]] = litellm_cost_map) -> None:
        self.settings = settings
        self._load_cost_map = load_cost_map
        self._known: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        if model not in self._known:
            if len(self._known) > 4096:  # model names are client input
                self._known.clear()
            self._known[model] = self._lookup(model)
        return self._known[model]

    def _lookup(self, model: str) -> Price | None:
        route = self.settings.route_for(model)
        configured = _price_of(route.model_info) if route is not None else None
        if configured is not None:
            return configured  # the cost map is not read (~10 ms, once) for a route that has its own prices
        cost_map = self._load_cost_map()
        name = route.provider_model if route is not None else model
        return _price_of(cost_map.get(name)) or _price_of(cost_map.get(name.partition("/")[2]))


def worst_case_output(body: Mapping[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def actual_tokens(usage: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI-style ``usage`` (Anthropic's names too), or None."""
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(prompt, 0), max(completion, 0)


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streaming request already asks for the final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def with_usage_requested(body: Mapping[str, Any]) -> dict[str, Any]:
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options if isinstance(options, Mapping) else {}), "include_usage": True}}


async def without_usage_chunk(chunks: AsyncIterable[Any]) -> AsyncIterator[bytes]:
    """The SSE stream minus the usage-only chunk the gateway asked for (``"choices": []`` with ``usage``).

    Events are re-cut at blank lines only where needed to find that one; every other byte goes as it came.
    """
    pending = b""
    async for chunk in chunks:
        pending += chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        cut = pending.rfind(b"\n\n")
        if cut < 0:
            continue
        complete, pending = pending[:cut + 2], pending[cut + 2:]
        if b'"usage"' in complete:
            complete = b"".join(e for e in _events(complete) if not _is_usage_only(e))
        if complete:
            yield complete
    if pending:
        yield pending


def _events(data: bytes) -> list[bytes]:
    parts = data.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]]


def _is_usage_only(event: bytes) -> bool:
    payload = event.strip()
    if not payload.startswith(b"data:") or b'"usage"' not in payload:
        return False
    try:
        data = orjson.loads(payload[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)
