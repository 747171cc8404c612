"""Per-row decoding pieces ``generate`` lacks: minimum length, seeded sampling and abandoned rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from transformers import (
    LogitsProcessor,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


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


class AbandonedRows(StoppingCriteria):
    """Ends a row whose caller gave up (or the whole batch at shutdown), so the worker frees up early."""

    def __init__(self, abandoned: Callable[[int], bool], rows: int) -> None:
        self.abandoned = abandoned
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = [self.abandoned(row) for row in range(self.rows)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
