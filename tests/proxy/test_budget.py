"""What a request costs (proxy/budget.py): prices by route or cost map, the worst case, the actual tokens."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from proxy.budget import Price, Pricing, actual_tokens, worst_case_output
from proxy.settings import ModelRoute, Settings


class CostMap(Mapping[str, Any]):
    """A cost map that remembers whether it was loaded and which names were looked up."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries = entries
        self.loads = 0
        self.asked: list[str] = []

    def load(self) -> CostMap:
        self.loads += 1
        return self

    def __getitem__(self, name: str) -> Any:
        self.asked.append(name)
        return self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def route(name: str, model: str, **info: float) -> ModelRoute:
    return ModelRoute(name, {"model": model}, dict(info))


def test_a_route_with_its_own_prices_never_reads_the_cost_map() -> None:
    cost_map = CostMap({"gpt-4o": {"input_cost_per_token": 9.0, "output_cost_per_token": 9.0}})
    settings = Settings(model_list=(route("fast", "openai/gpt-4o", input_cost_per_token=1e-6,
                                          output_cost_per_token=2e-6),))
    pricing = Pricing(settings, cost_map.load)
    assert pricing.price("fast") == Price(1e-6, 2e-6)
    assert cost_map.loads == 0  # litellm's file (~10 ms to read) is not read for it


def test_prices_come_from_the_cost_map_by_provider_model_then_without_its_prefix() -> None:
    cost_map = CostMap({"gpt-4o": {"input_cost_per_token": 3e-6, "output_cost_per_token": 4e-6},
                        "claude-x": {"input_cost_per_token": 5e-6, "output_cost_per_token": 6e-6}})
    settings = Settings(model_list=(route("chat", "openai/gpt-4o"),))
    pricing = Pricing(settings, cost_map.load)
    assert pricing.price("chat") == Price(3e-6, 4e-6)  # the route's provider model, prefix dropped
    assert pricing.price("anthropic/claude-x") == Price(5e-6, 6e-6)  # no route: the name as asked
    assert pricing.price("unknown") is None
    asked = len(cost_map.asked)
    assert pricing.price("chat") == Price(3e-6, 4e-6) and len(cost_map.asked) == asked  # remembered


def test_an_incomplete_or_negative_price_is_no_price() -> None:
    settings = Settings(model_list=(route("half", "openai/none", input_cost_per_token=1e-6),
                                    route("negative", "openai/none", input_cost_per_token=-1.0,
                                          output_cost_per_token=1.0)))
    pricing = Pricing(settings, CostMap({}).load)
    assert pricing.price("half") is None and pricing.price("negative") is None


@pytest.mark.parametrize(("body", "expected"), [
    ({"max_completion_tokens": 50, "max_tokens": 10}, 50),
    ({"max_tokens": 10}, 10),
    ({"max_output_tokens": 7}, 7),
    ({"max_tokens": True}, 4096),  # a boolean is no count
    ({"max_tokens": 0}, 4096),
    ({}, 4096),
])
def test_the_worst_case_output_is_what_the_request_allows_else_the_default(body: dict[str, Any],
                                                                             expected: int) -> None:
    assert worst_case_output(body, 4096) == expected


def test_actual_tokens_read_openai_and_anthropic_usage() -> None:
    assert actual_tokens({"prompt_tokens": 12, "completion_tokens": 6}) == (12, 6)
    assert actual_tokens({"input_tokens": 3, "output_tokens": 4}) == (3, 4)
    assert actual_tokens({"prompt_tokens": "12"}) is None
    assert actual_tokens(None) is None and actual_tokens({}) is None
