"""Failed authentications per client address: a burst, then an even pace, then 429s."""

from __future__ import annotations

import pytest

from voltage_ray.limits.throttle import FailureThrottle


def test_a_burst_then_one_failure_every_two_seconds() -> None:
    throttle = FailureThrottle(per_minute=30)
    assert [throttle.fail("a", 0.0) for _ in range(30)] == [0] * 30
    assert throttle.fail("a", 0.0) == 2  # 30 a minute: one every 2 s
    assert throttle.fail("a", 0.5) == 2  # refused failures take nothing, so waiting works
    assert throttle.fail("a", 2.0) == 0
    assert throttle.fail("a", 2.0) == 2
    assert throttle.fail("b", 2.0) == 0  # another address has its own bucket
    assert throttle.fail("a", 62.0) == 0  # a minute later the burst is back
    assert [throttle.fail("a", 62.0) for _ in range(29)] == [0] * 29


def test_memory_stays_bounded() -> None:
    throttle = FailureThrottle(per_minute=2, max_addresses=100)
    for i in range(100):
        throttle.fail(f"10.0.0.{i}", 0.0)
    assert len(throttle) == 100
    throttle.fail("busy", 0.0)  # all still busy: forgotten at once, the table starts again
    assert len(throttle) == 1
    for i in range(99):
        throttle.fail(f"10.0.1.{i}", 0.0)
    throttle.fail("late", 120.0)  # every bucket refilled by now: dropped as idle
    assert len(throttle) == 1


def test_the_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FailureThrottle(per_minute=0)
