"""The pure rate/quota arithmetic: windows, quotas with reservations, periods, headers."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from voltage_ray.limits import quota
from voltage_ray.limits.plans import Plan
from voltage_ray.limits.quota import Ask, Denial, Hold, KeyState, Usage, Window

T0 = dt.datetime(2025, 3, 14, 12, 0, tzinfo=dt.timezone.utc).timestamp()


def admit(plan: Plan, state: KeyState, usage: Usage, ask: Ask, now: float) -> Hold | Denial:
    return quota.admit("p", plan, state, usage, ask, now)


def test_period_is_the_utc_calendar_month() -> None:
    last = dt.datetime(2025, 3, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()
    assert quota.period_of(last) == "2025-03"
    assert quota.period_of(last + 1) == "2025-04"
    assert quota.period_end(last) == last + 1
    dec = dt.datetime(2024, 12, 5, tzinfo=dt.timezone.utc).timestamp()
    assert quota.period_end(dec) == dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_durations() -> None:
    assert quota.whole_seconds(0.01) == 1
    assert quota.whole_seconds(12.0) == 12
    assert quota.whole_seconds(12.2) == 13
    assert quota.format_reset(0) == "0s"
    assert quota.format_reset(0.0201) == "21ms"
    assert quota.format_reset(6.5) == "7s"
    assert quota.format_reset(360) == "6m0s"
    assert quota.format_reset(2 * 86400 + 61) == "48h1m1s"


def test_window_is_exact_over_sixty_seconds() -> None:
    w = Window()
    for i in range(5):
        w.add(T0 + i, 1)
    assert w.total == 5
    assert w.wait(1, 5, T0 + 10) == pytest.approx(50.0)  # the oldest leaves at T0 + 60
    assert w.wait(3, 5, T0 + 10) == pytest.approx(52.0)
    assert math.isinf(w.wait(6, 5, T0 + 10))
    w.prune(T0 + 60)
    assert w.total == 4
    assert w.reset_in(T0 + 60) == pytest.approx(4.0)


def test_window_adjust_only_while_the_entry_counts() -> None:
    w = Window()
    entry = w.add(T0 + 0.0101, 100)
    w.adjust(entry, -70)
    assert w.total == 30
    assert w.add(T0 + 0.0105, 5) is entry  # the same 0.1 s tick shares an entry
    assert w.total == 35 and entry[1] == 35
    w.prune(T0 + 61)
    w.adjust(entry, 50)  # already out of the window: no effect
    assert w.total == 0


def test_requests_per_minute_admits_exactly_the_limit() -> None:
    plan, state, usage = Plan(requests_per_minute=5), KeyState(), Usage("2025-03")
    results = [admit(plan, state, usage, Ask(), T0 + i * 0.001) for i in range(40)]
    assert sum(isinstance(r, Hold) for r in results) == 5
    denial = results[-1]
    assert isinstance(denial, Denial) and denial.kind == "rate"
    assert denial.retry_after == 60
    assert denial.details["retry_after"] == 60
    later = admit(plan, state, usage, Ask(), T0 + 45)
    assert isinstance(later, Denial) and later.retry_after == 15
    assert isinstance(admit(plan, state, usage, Ask(), T0 + 60.001), Hold)


def test_monthly_tokens_count_reservations_and_settle_to_actual() -> None:
    plan, state, usage = Plan(tokens_per_month=100), KeyState(), Usage("2025-03")
    a = admit(plan, state, usage, Ask(tokens=40), T0)
    b = admit(plan, state, usage, Ask(tokens=40), T0)
    c = admit(plan, state, usage, Ask(tokens=40), T0)
    assert isinstance(a, Hold) and isinstance(b, Hold)
    assert isinstance(c, Denial) and c.kind == "quota"
    assert c.details["usage"] == {"tokens_used": 0, "tokens_limit": 100}
    assert c.details["tokens_reserved"] == 80 and c.details["plan"] == "p"
    quota.release(state, usage, a, 10, 0)
    assert (usage.tokens, usage.reserved_tokens, state.in_flight) == (10, 40, 1)
    assert isinstance(admit(plan, state, usage, Ask(tokens=40), T0), Hold)
    # 10 used + 80 reserved: 11 more does not fit, 10 does.
    assert isinstance(admit(plan, state, usage, Ask(tokens=11), T0), Denial)
    assert isinstance(admit(plan, state, usage, Ask(tokens=10), T0), Hold)


def test_images_quota_and_tokens_do_not_interfere() -> None:
    plan = Plan(tokens_per_month=0, images_per_month=2)
    state, usage = KeyState(), Usage("2025-03")
    assert isinstance(admit(plan, state, usage, Ask(images=2), T0), Hold)
    denial = admit(plan, state, usage, Ask(images=1), T0)
    assert isinstance(denial, Denial)
    assert denial.details["usage"] == {"images_used": 0, "images_limit": 2}
    assert isinstance(admit(plan, state, usage, Ask(tokens=1), T0), Denial)


def test_a_refusal_takes_nothing() -> None:
    plan = Plan(requests_per_minute=10, tokens_per_month=50, max_concurrent_requests=5)
    state, usage = KeyState(), Usage("2025-03")
    assert isinstance(admit(plan, state, usage, Ask(tokens=60), T0), Denial)
    assert (state.requests.total, state.in_flight, usage.requests, usage.reserved_tokens) == (
        0,
        0,
        0,
        0,
    )


def test_tokens_per_minute_window_and_oversized_requests() -> None:
    plan, state, usage = Plan(tokens_per_minute=100), KeyState(), Usage("2025-03")
    hold = admit(plan, state, usage, Ask(tokens=80), T0)
    assert isinstance(hold, Hold)
    denial = admit(plan, state, usage, Ask(tokens=30), T0 + 1)
    assert isinstance(denial, Denial) and denial.kind == "rate" and denial.retry_after == 59
    quota.release(state, usage, hold, 20, 0)  # the window keeps the actual amount
    assert isinstance(admit(plan, state, usage, Ask(tokens=30), T0 + 2), Hold)
    too_big = admit(plan, state, usage, Ask(tokens=101), T0 + 3)
    assert isinstance(too_big, Denial) and too_big.kind == "forbidden"


def test_concurrency_and_model_allow_list() -> None:
    plan = Plan(max_concurrent_requests=2, models=["tiny-chat"])
    state, usage = KeyState(), Usage("2025-03")
    a = admit(plan, state, usage, Ask(models=("tiny-chat", "gpt-4")), T0)
    admit(plan, state, usage, Ask(models=("tiny-chat",)), T0)
    third = admit(plan, state, usage, Ask(models=("tiny-chat",)), T0)
    assert isinstance(third, Denial) and third.kind == "rate" and third.retry_after == 1
    assert isinstance(a, Hold)
    quota.release(state, usage, a, 0, 0)
    assert isinstance(admit(plan, state, usage, Ask(models=("tiny-chat",)), T0), Hold)
    other = admit(plan, state, usage, Ask(models=("other",)), T0)
    assert isinstance(other, Denial) and other.kind == "forbidden"
    assert other.details["allowed_models"] == ["tiny-chat"]


def test_headers() -> None:
    plan = Plan(requests_per_minute=5, tokens_per_month=1000, images_per_month=3)
    state, usage = KeyState(), Usage("2025-03")
    ask = Ask(tokens=100)
    admit(plan, state, usage, ask, T0)
    h = quota.headers(plan, state, usage, ask, T0 + 10)
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "4"
    assert h["x-ratelimit-reset-requests"] == "50s"
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "900"
    assert h["x-ratelimit-reset-tokens"].endswith("s") and "h" in h["x-ratelimit-reset-tokens"]
    assert "x-ratelimit-limit-images" not in h
    img = quota.headers(plan, state, usage, Ask(images=1), T0)
    assert img["x-ratelimit-remaining-images"] == "3" and "x-ratelimit-limit-tokens" not in img
    assert quota.headers(Plan(), state, usage, ask, T0) == {}
    tpm = Plan(tokens_per_minute=500, tokens_per_month=1000)
    assert quota.headers(tpm, KeyState(), usage, ask, T0)["x-ratelimit-limit-tokens"] == "500"


def test_window_dump_rounds_up_to_whole_seconds() -> None:
    w = Window()
    for t in (0.2, 0.7, 1.5):
        w.add(T0 + t, 1)
    assert w.dump() == [(T0 + 1, 2), (T0 + 2, 1)]  # restored entries expire no earlier
    restored = Window(entries=w.dump())
    assert restored.total == 3 and restored.wait(1, 3, T0 + 2) == pytest.approx(59.0)


def test_a_void_release_gives_the_request_back() -> None:
    plan = Plan(requests_per_minute=2, tokens_per_minute=100)
    state, usage = KeyState(), Usage("2025-03")
    holds = [admit(plan, state, usage, Ask(tokens=40), T0) for _ in range(2)]
    assert isinstance(admit(plan, state, usage, Ask(tokens=1), T0), Denial)
    first = holds[0]
    assert isinstance(first, Hold)
    quota.release(state, usage, first, 0, 0, counted=False)  # turned away: nothing happened
    assert (usage.requests, usage.tokens, usage.reserved_tokens) == (1, 0, 40)
    assert state.requests.total == 1 and state.tokens.total == 40 and state.in_flight == 1
    assert isinstance(admit(plan, state, usage, Ask(tokens=1), T0 + 1), Hold)
