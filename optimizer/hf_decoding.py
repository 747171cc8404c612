"""Per-row decoding pieces ``generate`` lacks: minimum length, seeded sampling, budgets and abandoned rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# What generate() samples with when neither the call nor the model's generation config names a top-k.
FALLBACK_TOP_K = 50


def row_seed(seed: int, mode: str, text: str) -> int:
    """One seed per (seed, mode, prompt): a seeded rewrite is the same whatever shares its batch."""
    digest = hashlib.sha256(f"{seed}\0{mode}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


class RowMinNewTokens(LogitsProcessor):
    """Aggressive mode's "at least prompt tokens + 5": each row's stop tokens stay banned until its minimum.

    ``generate``'s own ``min_new_tokens`` is one number for the whole batch; prompts in a batch differ.
    """

    def __init__(self, prompt_length: int, minimums: Sequence[int], stop_ids: Sequence[int]) -> None:
        self.prompt_length = prompt_length
        self.minimums = torch.tensor(list(minimums))
        self.stop_ids = torch.tensor(list(stop_ids))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_length
        rows = torch.nonzero(self.minimums > generated).flatten().to(scores.device)
        if rows.numel():
            scores[rows.unsqueeze(1), self.stop_ids.to(scores.device).unsqueeze(0)] = -float("inf")
        return scores


class SeededRowSampler(LogitsProcessor):
    """Samples every row with its own generator and leaves only the chosen token possible.

    It applies the mode's temperature and top-p itself, because ``generate`` runs custom processors
    before its own warpers; those warpers then see a single finite logit and keep it.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int | None,
                 device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        # The order generate() uses: temperature, top-k, top-p.
        self.warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = scores
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        probabilities = torch.softmax(warped.float(), dim=-1)
        chosen = torch.stack([
            torch.multinomial(probabilities[row], 1, generator=generator)
            for row, generator in enumerate(self.generators)
        ])
        only_chosen = torch.full_like(scores, -float("inf"))
        return only_chosen.scatter_(1, chosen, 0.0)  # type: ignore[return-value]


def effective_top_k(generation_config: Any) -> int | None:
    """The top-k an unseeded ``generate`` would use: the model's, else transformers' own default.

    transformers 5 leaves unset fields None in the model's config and fills them in at ``generate``;
    4.x stores 50 in the config itself. Either way the seeded sampler must match the unseeded one.
    """
    top_k = getattr(generation_config, "top_k", None)
    if top_k is None:
        defaults = getattr(type(generation_config), "_get_default_generation_params", None)
        top_k = defaults().get("top_k", FALLBACK_TOP_K) if callable(defaults) else FALLBACK_TOP_K
    return int(top_k) if top_k else None


class RowStops(StoppingCriteria):
    """Ends each row on its own: at a stop token, at its own token budget, or when its caller gave up.

    It keeps what ``generate`` does not say: how many tokens each row produced before it ended, and
    whether it was cut (``truncated``: budget spent, or abandoned) rather than stopping by itself.
    """

    def __init__(self, prompt_length: int, budgets: Sequence[int], stop_ids: Sequence[int],
                 abandoned: Callable[[int], bool]) -> None:
        self.prompt_length = prompt_length
        self.budgets = list(budgets)
        self.stop_ids = set(stop_ids)
        self.abandoned = abandoned
        self.lengths: list[int | None] = [None] * len(self.budgets)
        self.truncated = [False] * len(self.budgets)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        last = input_ids[:, -1].tolist()
        for row, budget in enumerate(self.budgets):
            if self.lengths[row] is not None:
                continue
            if last[row] in self.stop_ids:
                self.lengths[row] = generated
            elif generated >= budget or self.abandoned(row):
                # Cut short either way: a row ended at shutdown is no more a whole rewrite than one over budget.
                self.lengths[row], self.truncated[row] = generated, True
        done = [length is not None for length in self.lengths]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
