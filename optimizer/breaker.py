"""A circuit breaker, so a dead dependency costs no per-request timeout after its first failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """closed -> (``failure_threshold`` consecutive failures) -> open -> (cooldown) -> half-open.

    Half-open lets one probe through: its success closes the breaker, its failure reopens it with a
    doubled cooldown (capped), so a long outage costs one probe per ``max_cooldown``. A probe that
    never reports (its caller was cancelled) is replaced by a new one after a cooldown.
    """

    def __init__(self, failure_threshold: int = 3, cooldown_seconds: float = 0.5, max_cooldown_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.base_cooldown = cooldown_seconds
        self.max_cooldown = max_cooldown_seconds
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._cooldown = cooldown_seconds
        self._since = 0.0  # when the breaker opened, or when the current probe started
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go to the dependency now? In half-open, True for the single probe only."""
        if self._state == "closed":
            return True
        if self._clock() - self._since < self._cooldown:
            return False
        self._state = "half-open"
        self._since = self._clock()
        return True

    def record_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._cooldown = self.base_cooldown

    def record_failure(self) -> None:
        self._failures += 1
        if self._state == "half-open":
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open()
        elif self._state == "closed" and self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self._since = self._clock()
        self.opened_count += 1
