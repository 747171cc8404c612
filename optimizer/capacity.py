"""What the device can do: measured generation speed, the deadline check, and the lower bound behind ``busy``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from optimizer.base import Mode
from optimizer.guard import MIN_LENGTH_RATIO
from optimizer.template import DECODING, build_prompt

# The reference rewrites' median is 17 words (../shared/data/bpo/pairs.json): about 23-32 tokens.
TYPICAL_REWRITE_TOKENS = 32
# A prompt of the reference prompts' median length (12 words) for the measurement.
SPEED_PROMPT = "Write a short guide for a beginner who wants to start running three times a week without injury."
SPEED_TOKENS = 16


@dataclass(frozen=True)
class DeviceSpeed:
    """One measurement of this model on this device: prompt processing and per-token decoding time."""

    prefill_seconds: float
    seconds_per_token: float

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token

    def rewrite_seconds(self, new_tokens: int = TYPICAL_REWRITE_TOKENS) -> float:
        return self.prefill_seconds + new_tokens * self.seconds_per_token

    def least_seconds(self, text: str, mode: Mode) -> float:
        """A lower bound on one rewrite of ``text``: the fewest tokens a rewrite the guard accepts can have.

        Words stand in for tokens (a word is at least one token), so this never overestimates.
        """
        words = len(text.split())
        extra = DECODING[mode].min_extra_tokens
        fewest = words + 1 + extra if extra is not None else math.ceil(MIN_LENGTH_RATIO * words)
        return self.prefill_seconds + max(1, fewest) * self.seconds_per_token

    def describe(self, deadline: float) -> str:
        typical = self.rewrite_seconds()
        text = (f"{self.tokens_per_second:.1f} tokens/s; a typical rewrite ({TYPICAL_REWRITE_TOKENS} tokens) "
                f"takes ~{typical:.1f} s")
        return text + (f", over the {deadline:g} s deadline" if typical > deadline else "")

    def as_dict(self, deadline: float) -> dict[str, Any]:
        typical = self.rewrite_seconds()
        return {"tokens_per_second": round(self.tokens_per_second, 2),
                "prefill_seconds": round(self.prefill_seconds, 3),
                "typical_rewrite_seconds": round(typical, 2), "deadline_seconds": deadline,
                "deadline_too_short": typical > deadline}


def measure_speed(model: Any, tokenizer: Any) -> DeviceSpeed:
    """Time a warm-up, a one-token and a (1 + SPEED_TOKENS)-token greedy generation of one prompt."""
    import torch

    inputs = tokenizer([build_prompt(SPEED_PROMPT)], return_tensors="pt").to(model.device)

    def seconds(tokens: int) -> float:
        started = time.perf_counter()
        model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - started

    with torch.inference_mode():
        seconds(1)  # the first call pays for lazy initialisation
        one = seconds(1)
        many = seconds(1 + SPEED_TOKENS)
    return DeviceSpeed(prefill_seconds=one, seconds_per_token=max((many - one) / SPEED_TOKENS, 1e-6))
