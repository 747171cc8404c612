"""The BPO prompt template and the two decoding modes the paper's optimizer uses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from optimizer.base import Mode

TEMPLATE = (
    "[INST] You are an expert prompt engineer. Please help me improve this prompt to get a more "
    "helpful and harmless response:\n{prompt} [/INST]"
)
# Bump when TEMPLATE or clean_output change: it is part of every cache key.
TEMPLATE_VERSION = "1"

# Aggressive decoding must never emit the critic's protection markers.
BANNED_STRINGS = ("[PROTECT]", "[KEEP", "[INSTRUCTION]")
# The reference cuts an aggressive rewrite at the first of these, wherever it appears.
_LEAKED_MARKER = re.compile(r"\[(?:KE|INS|PRO)")


@dataclass(frozen=True)
class Decoding:
    """Sampling settings for one mode."""

    temperature: float
    top_p: float
    stop_at_newline: bool
    # Aggressive mode forces at least (prompt tokens + this) new tokens, as the reference does.
    min_extra_tokens: int | None


DECODING: dict[str, Decoding] = {
    "stable": Decoding(temperature=0.6, top_p=0.9, stop_at_newline=False, min_extra_tokens=None),
    "aggressive": Decoding(temperature=0.9, top_p=0.9, stop_at_newline=True, min_extra_tokens=5),
}


def build_prompt(text: str) -> str:
    """The optimizer's input for a user prompt."""
    return TEMPLATE.format(prompt=text)


def clean_output(generated: str, mode: Mode) -> str:
    """Turn raw generated text into the rewrite: trim; aggressive: cut at the newline and at the first marker."""
    text = generated.strip()
    if mode == "aggressive":
        text = text.split("\n", 1)[0]
        text = _LEAKED_MARKER.split(text, maxsplit=1)[0].strip()
    return text
