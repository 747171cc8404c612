"""The circuit breaker that keeps a dead Redis from costing a timeout per request."""

from __future__ import annotations

from optimizer.breaker import CircuitBreaker
from tests.optimizer.cache_helpers import FakeClock


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock(0.0))
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # the count is of consecutive failures
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow() and breaker.opened_count == 1


def test_half_open_lets_one_probe_through_and_success_closes() -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=1.0, clock=clock)
    breaker.record_failure()
    clock.now = 0.99
    assert not breaker.allow()
    clock.now = 1.0
    assert breaker.allow() and breaker.state == "half-open"
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_failed_probes_double_the_cooldown_up_to_the_cap() -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=1.0, max_cooldown_seconds=3.0, clock=clock)
    breaker.record_failure()
    waits = []
    for _ in range(4):
        opened = clock.now
        while not breaker.allow():
            clock.now += 0.25
        waits.append(clock.now - opened)
        breaker.record_failure()
    assert waits == [1.0, 2.0, 3.0, 3.0]
    clock.now += 3.0
    assert breaker.allow()
    breaker.record_success()
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()  # success reset the cooldown to its base


def test_a_probe_that_never_reports_is_replaced_after_a_cooldown() -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()  # this probe's caller is cancelled and never reports
    clock.now = 1.5
    assert not breaker.allow()
    clock.now = 2.0
    assert breaker.allow()
