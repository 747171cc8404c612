"""Arm assignment: the split, stickiness, ramps, sticky-key precedence and the X-BPO override."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.ab import ArmAssigner, InvalidOverride, arm_for, bucket, sticky_key
from proxy.errors import ProxyError
from tests.fakes.proxy_server import make_settings

USERS = [f"user-{i}" for i in range(1000)]


def assigner(**values: Any) -> ArmAssigner:
    return ArmAssigner(make_settings(**values))


def treatment_users(a: ArmAssigner, users: list[str] = USERS) -> set[str]:
    return {u for u in users if a.decide({"user": u}, {}, None).arm == "treatment"}


@pytest.mark.parametrize("percent", [10, 30, 50, 90])
def test_the_split_fraction_over_1000_users_is_within_tolerance(percent: float) -> None:
    share = len(treatment_users(assigner(ab_treatment_percent=percent))) / len(USERS)
    # Binomial sd at n=1000 is at most 1.6 points; 5 points is more than 3 sd.
    assert abs(share - percent / 100) < 0.05


def test_zero_and_hundred_percent_put_everyone_in_one_arm() -> None:
    assert treatment_users(assigner(ab_treatment_percent=0)) == set()
    assert treatment_users(assigner(ab_treatment_percent=100)) == set(USERS)


def test_the_same_salt_gives_the_same_arms_in_a_new_assigner() -> None:
    first = treatment_users(assigner(ab_treatment_percent=40, ab_salt="s1"))
    assert treatment_users(assigner(ab_treatment_percent=40, ab_salt="s1")) == first
    other_salt = treatment_users(assigner(ab_treatment_percent=40, ab_salt="s2"))
    assert other_salt != first and len(first ^ other_salt) > 200  # a new salt reshuffles


def test_ramping_up_keeps_every_earlier_treatment_user_in_treatment() -> None:
    previous: set[str] = set()
    for percent in (1, 10, 25, 50, 75, 99):
        current = treatment_users(assigner(ab_treatment_percent=percent, ab_salt="ramp"))
        assert previous <= current
        assert len(current) > len(previous)
        previous = current


def test_bucket_is_uniform_enough_and_in_range() -> None:
    buckets = [bucket("salt", u) for u in USERS]
    assert all(0 <= b < 100 for b in buckets)
    assert sum(b < 50 for b in buckets) == len([u for u in USERS if arm_for("salt", u, 50) == "treatment"])


def test_sticky_key_prefers_body_user_then_header_then_api_key() -> None:
    assert sticky_key({"user": "alice"}, {"x-bpo-user": "bob"}, "sk-1") == "user:alice"
    assert sticky_key({}, {"x-bpo-user": "bob"}, "sk-1") == "user:bob"
    # Same id through the body or the header lands in the same arm.
    assert sticky_key({"user": "bob"}, {}, None) == sticky_key({}, {"x-bpo-user": "bob"}, None)
    by_key = sticky_key({}, {}, "sk-secret")
    assert by_key.startswith("key:") and "sk-secret" not in by_key
    assert by_key == sticky_key({"user": ""}, {"x-bpo-user": "  "}, "sk-secret")


def test_requests_with_no_sticky_key_are_assigned_at_random() -> None:
    a = assigner(ab_treatment_percent=50)
    arms = [a.decide({}, {}, None).arm for _ in range(200)]
    assert {"treatment", "control"} == set(arms)


def test_the_api_key_keeps_a_client_in_one_arm() -> None:
    a = assigner(ab_treatment_percent=50)
    for key in ("sk-a", "sk-b", "sk-c", "sk-d"):
        assert len({a.decide({}, {}, key).arm for _ in range(20)}) == 1


def test_treatment_optimizes_in_the_default_mode_and_control_does_not() -> None:
    a = assigner(ab_treatment_percent=50, mode="aggressive")
    decisions = {a.decide({"user": u}, {}, None) for u in USERS[:50]}
    treatment = next(d for d in decisions if d.arm == "treatment")
    control = next(d for d in decisions if d.arm == "control")
    assert (treatment.optimize, treatment.mode, treatment.reason, treatment.override) == (
        True, "aggressive", None, False)
    assert (control.optimize, control.reason, control.override) == (False, "control-arm", False)
    assert (treatment.stats_arm, control.stats_arm) == ("treatment", "control")


@pytest.mark.parametrize(("header", "optimize", "mode", "reason"), [
    ("on", True, "stable", None), ("OFF", False, "stable", "disabled"), (" stable ", True, "stable", None),
    ("aggressive", True, "aggressive", None)])
def test_x_bpo_overrides_the_arm_and_is_recorded_as_an_override(header: str, optimize: bool, mode: str,
                                                                reason: str | None) -> None:
    a = assigner(ab_treatment_percent=50)
    for user in USERS[:20]:
        decision = a.decide({"user": user}, {"x-bpo": header}, None)
        assert (decision.optimize, decision.mode, decision.reason, decision.override) == (
            optimize, mode, reason, True)
        assert decision.arm == ("treatment" if optimize else "control")
        assert decision.stats_arm == "override"


def test_without_a_split_the_default_decides_and_no_arm_is_named() -> None:
    on = assigner().decide({"user": "u"}, {}, None)
    assert (on.arm, on.optimize, on.reason, on.stats_arm) == (None, True, None, "none")
    off = assigner(optimize_by_default=False).decide({"user": "u"}, {}, None)
    assert (off.arm, off.optimize, off.reason) == (None, False, "disabled")
    forced = assigner(optimize_by_default=False).decide({}, {"x-bpo": "on"}, None)
    assert (forced.arm, forced.optimize, forced.override) == (None, True, True)


@pytest.mark.parametrize("value", ["yes", "1", "turbo", "on,off"])
def test_an_invalid_x_bpo_value_is_a_400_value_error(value: str) -> None:
    with pytest.raises(InvalidOverride) as caught:
        assigner().decide({}, {"x-bpo": value}, None)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ProxyError)
    assert caught.value.status == 400 and caught.value.param == "X-BPO"


def test_a_blank_x_bpo_header_is_ignored() -> None:
    assert not assigner(ab_treatment_percent=100).decide({"user": "u"}, {"x-bpo": " "}, None).override
