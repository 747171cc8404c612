"""Token budgets: how many new tokens one rewrite may take, and how many aggressive mode must take first."""

from __future__ import annotations

import math

from optimizer.base import Mode
from optimizer.guard import MAX_LENGTH_FLOOR_WORDS, MAX_LENGTH_RATIO
from optimizer.template import DECODING

# A rewrite may run to 6x its prompt (the guard's bound, where the reference rewrites end); short prompts
# grow to a few dozen words, so the budget never drops under two tokens per word of that floor.
MIN_BUDGET_TOKENS = 2 * MAX_LENGTH_FLOOR_WORDS
# Tokens per word is about 4/3 for Llama-style tokenizers on English, for backends that cannot count.
TOKENS_PER_WORD = 4 / 3


def token_budget(prompt_tokens: int, cap: int) -> int:
    """The most new tokens one rewrite may take: room for 6x its prompt, never less than the floor, capped."""
    return max(1, min(cap, max(MIN_BUDGET_TOKENS, math.ceil(MAX_LENGTH_RATIO * prompt_tokens))))


def min_new_tokens(prompt_tokens: int, mode: Mode) -> int | None:
    """Aggressive mode's minimum: the prompt's tokens *with* special tokens (BOS), plus 5, as the reference."""
    extra = DECODING[mode].min_extra_tokens
    return None if extra is None else prompt_tokens + extra


def estimate_tokens(text: str) -> int:
    """A token count for backends whose tokenizer lives elsewhere (remote:, llm:), with one for BOS."""
    return round(len(text.split()) * TOKENS_PER_WORD) + 1
