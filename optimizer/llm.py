"""``llm:`` backend: any chat model, through litellm, asked with a BPO-style instruction to rewrite the prompt.

The trade-off (BPO paper, Table 2): a general chat model prompted to optimize gains far less than the
trained optimizer (about +4.6 vs +22.0 ΔWR on the same targets), but it needs no GPU and no download.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from optimizer.base import (
    Mode,
    OptimizerError,
    OptimizerOptions,
    OptimizerStatus,
    OptimizerUnavailable,
    Rewrite,
    State,
)
from optimizer.budget import estimate_tokens, token_budget
from optimizer.identity import format_identity, short_hash
from optimizer.template import DECODING, clean_output

log = logging.getLogger("bpo.optimizer.llm")

# Bump when the instructions change: it is the "version" of an llm: optimizer, so the cache follows it.
INSTRUCTION_VERSION = "1"
INSTRUCTION = (
    "You are an expert prompt engineer. Improve the user's prompt so that an AI assistant gives a more "
    "helpful and harmless response: make the request clearer and more specific, and state what a good "
    "answer should contain. Keep the user's intent and everything they provided exactly as written: "
    "numbers, names, URLs, e-mail addresses, quoted text, code and placeholders such as {name} or <item>. "
    "Do not answer the prompt and do not add facts. Reply with the improved prompt only: no preamble, "
    "no quotes, no explanation."
)
AGGRESSIVE_SUFFIX = " Rewrite it thoroughly, and write the improved prompt on a single line."
_PREAMBLE = re.compile(r"^\s*(?:here is |here's )?(?:the |an |your )?(?:improved|optimi[sz]ed|rewritten|better)"
                       r" (?:prompt|version)\s*(?:is)?\s*:\s*", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'", "`": "`"}


def messages_for(text: str, mode: Mode) -> list[dict[str, str]]:
    instruction = INSTRUCTION + (AGGRESSIVE_SUFFIX if mode == "aggressive" else "")
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": f"Prompt to improve:\n{text}"}]


def unwrap(answer: str) -> str:
    """Chat models like to say "Improved prompt: ..." or to quote the result; keep the prompt only."""
    text = _PREAMBLE.sub("", answer.strip(), count=1).strip()
    closing = _QUOTE_PAIRS.get(text[:1])
    # Only a quote around the whole answer: '"a" and "b"' keeps its quotes.
    if closing and len(text) >= 2 and text.endswith(closing) and closing not in text[1:-1]:
        text = text[1:-1].strip()
    return text


class LLMOptimizer:
    """Rewrites with ``litellm.acompletion``; litellm is imported in the background by ``start()``."""

    def __init__(self, model: str, options: OptimizerOptions, *, api_base: str | None = None) -> None:
        self.model = model
        self.options = options
        self.api_base = api_base
        self._identity = format_identity(f"llm:{model}", f"i{INSTRUCTION_VERSION}-{short_hash(INSTRUCTION)[:6]}")
        self._state: State = "loading"
        self._detail = "importing litellm"
        self._litellm: Any = None
        self._import: asyncio.Task[None] | None = None

    @property
    def identity(self) -> str:
        return self._identity

    def status(self) -> OptimizerStatus:
        return OptimizerStatus(self._state, self._identity, self._detail)

    async def start(self) -> None:
        if self._import is None:
            self._import = asyncio.create_task(self._load(), name="bpo-import-litellm")

    async def wait_loaded(self) -> OptimizerStatus:
        if self._import is not None:
            await asyncio.shield(self._import)
        return self.status()

    async def close(self) -> None:
        if self._import is not None and not self._import.done():
            self._import.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._import

    async def optimize(self, text: str, mode: Mode) -> Rewrite:
        if self._litellm is None:
            raise OptimizerUnavailable(f"llm optimizer is {self._state}: {self._detail}")
        decoding = DECODING[mode]
        kwargs: dict[str, Any] = {
            "model": self.model, "messages": messages_for(text, mode), "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "max_tokens": token_budget(estimate_tokens(text), self.options.max_new_tokens),
            "timeout": self.options.request_timeout, "num_retries": 0,
        }
        if self.options.seed is not None:
            kwargs["seed"] = self.options.seed
        if self.options.api_key:
            kwargs["api_key"] = self.options.api_key
        if self.api_base:
            kwargs["api_base"] = self.api_base
        try:
            response = await self._litellm.acompletion(**kwargs)
            choice = response.choices[0]
            answer = choice.message.content or ""
        except Exception as exc:  # litellm's provider errors are translated here, at the one boundary
            # The class and status only: litellm's text quotes the provider's answer (and so the prompt).
            status = getattr(exc, "status_code", None)
            raise OptimizerError(f"llm:{self.model} failed: {type(exc).__name__}"
                                 + (f" ({status})" if status else "")) from exc
        self._report_usage(response)
        # litellm maps every provider's "ran out of tokens" (Anthropic's max_tokens too) to "length".
        truncated = getattr(choice, "finish_reason", None) == "length"
        return Rewrite(clean_output(unwrap(answer), mode), self._identity, truncated=truncated)

    def _report_usage(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        if self.options.on_usage is None or usage is None:
            return
        self.options.on_usage(self.model, usage.model_dump() if hasattr(usage, "model_dump") else dict(usage))

    async def _load(self) -> None:
        from optimizer.litellm_loader import load_litellm

        try:
            self._litellm = await asyncio.to_thread(load_litellm)
        except ImportError as exc:
            self._state, self._detail = "failed", f"llm:{self.model} needs litellm: pip install litellm ({exc})"
            log.warning("optimizer llm:%s unavailable: %s", self.model, self._detail)
            return
        self._state, self._detail = "ready", f"{self.model} through litellm"
