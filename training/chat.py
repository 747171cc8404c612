"""One chat model reached through litellm: bounded concurrency, a request-rate cap, retries with backoff."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from training.errors import ChatError


@dataclass(frozen=True)
class ChatModel:
    """Where and how to ask one chat model (the critic, the target or the judge)."""

    model: str
    base_url: str | None = None
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout: float = 120.0

    @property
    def litellm_model(self) -> str:
        from optimizer.litellm_loader import litellm_model

        return litellm_model(self.model, self.base_url)

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.base_url:
            # Local OpenAI-compatible servers (vLLM, the fake upstream) accept any key, but the OpenAI SDK
            # refuses to send a request without one.
            return os.environ.get("OPENAI_API_KEY") or "EMPTY"
        return None  # litellm finds the provider's own key (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...)


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart; ``rate <= 0`` means no cap."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


# Status codes a retry can fix: timeouts, conflicts, rate limits and server-side failures.
_RETRYABLE_STATUS = {408, 409, 429}


def is_retryable(exc: BaseException) -> bool:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in _RETRYABLE_STATUS or status >= 500
    return isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError))


class ChatClient:
    """Asks one chat model; share one client per model so its limits hold across all tasks."""

    def __init__(self, model: ChatModel, concurrency: int = 8, rate: float = 0.0, max_retries: int = 5,
                 backoff: float = 1.0) -> None:
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.calls = 0
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._limiter = RateLimiter(rate)

    async def complete(self, messages: list[dict[str, str]], **extra: Any) -> Answer:
        """The model's answer to ``messages``; raises ``ChatError`` once the retries are spent."""
        attempt = 0
        while True:
            try:
                async with self._semaphore:
                    await self._limiter.wait()
                    return await self._request(messages, extra)
            except Exception as exc:  # litellm maps provider errors to its own tree; we sort them here
                attempt += 1
                if not is_retryable(exc) or attempt > self.max_retries:
                    raise ChatError(f"{self.model.model}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(self._delay(attempt))

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with full jitter, so many tasks retrying at once do not stampede.
        return random.uniform(0, self.backoff * 2 ** (attempt - 1))

    async def _request(self, messages: list[dict[str, str]], extra: dict[str, Any]) -> Answer:
        import litellm

        litellm.suppress_debug_info = True  # no "Give Feedback" banner on every retried error
        self.calls += 1
        response = await litellm.acompletion(
            model=self.model.litellm_model, messages=messages, api_base=self.model.base_url,
            api_key=self.model.resolved_api_key(), temperature=self.model.temperature,
            max_tokens=self.model.max_tokens, timeout=self.model.timeout, num_retries=0, **extra)
        choice = response.choices[0]
        content = choice.message.content
        if not isinstance(content, str):
            raise ChatError(f"{self.model.model}: the answer has no text content")
        return Answer(content, choice.finish_reason)
