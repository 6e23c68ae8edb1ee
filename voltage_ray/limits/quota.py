"""Pure rate and quota arithmetic: no Ray, no I/O, no clock of its own (``now`` is passed in).

The limiter actor keeps one :class:`KeyState` per key and one :class:`Usage` per key and calendar
month, and calls :func:`admit` and :func:`release` with them while it holds its write lock. An
admission either takes everything it needs (a request slot, a concurrency slot, its token and image
reservations) or nothing, so limits stay exact whatever the concurrency.

- Requests and tokens per minute use a log of ``[time, amount]`` entries over the last 60 seconds:
  exact ("at most N in any 60 s"), not a fixed-window or sliding-counter approximation.
- Monthly quotas count settled usage plus outstanding reservations; they reset at the start of each
  calendar month (UTC) because usage is kept per period (``"YYYY-MM"``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from voltage_ray.limits.plans import Plan

MINUTE = 60.0
TICKS_PER_S = 1000  # window entries are 1 ms buckets: a busy key's window stays bounded


# --- calendar and durations ---------------------------------------------------------------------


def period_of(now: float) -> str:
    """The quota period (calendar month, UTC) that ``now`` falls in, e.g. ``"2025-03"``."""
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m")


def period_end(now: float) -> float:
    """The epoch time at which the period of ``now`` ends (the next month's first instant, UTC)."""
    d = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.timezone.utc).timestamp()


def whole_seconds(seconds: float) -> int:
    """Seconds rounded up, at least 1: what ``Retry-After`` and ``retry_after`` carry."""
    return max(1, math.ceil(seconds - 1e-9))


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds - 1e-9)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --- sliding windows ----------------------------------------------------------------------------


class Window:
    """Amounts taken in the last ``span`` seconds, as a log of ``[time, amount, live]`` entries.

    Amounts taken within one 1 ms tick share an entry stamped with the tick's end: an amount is
    held at most 1 ms longer than a minute, never shorter, so the limit stays exact. An entry
    stays mutable until it leaves the window, so a token reservation can be corrected to the
    actual usage when the request settles (``live`` tells whether it still counts). Amounts are
    also summed per whole second (rounded up) as they change, so :meth:`dump`, which the limiter
    writes with every admission, costs at most ``span`` rows, not one per entry.
    """

    __slots__ = ("entries", "seconds", "span", "total")

    def __init__(self, span: float = MINUTE, entries: Iterable[tuple[float, int]] = ()) -> None:
        self.span = span
        self.entries: deque[list[Any]] = deque([t, n, True] for t, n in entries)
        self.total = sum(e[1] for e in self.entries)
        self.seconds: dict[int, int] = {}
        for t, n, _live in self.entries:
            self._count(t, n)

    def _count(self, t: float, amount: int) -> None:
        second = math.ceil(t)
        left = self.seconds.get(second, 0) + amount
        if left:
            self.seconds[second] = left
        else:
            self.seconds.pop(second, None)

    def prune(self, now: float) -> None:
        horizon = now - self.span
        entries = self.entries
        while entries and entries[0][0] <= horizon:
            entry = entries.popleft()
            self.total -= entry[1]
            self._count(entry[0], -entry[1])
            entry[2] = False

    def add(self, now: float, amount: int) -> list[Any]:
        """Take ``amount`` now; returns the entry holding it (shared within a tick)."""
        tick = math.ceil(now * TICKS_PER_S) / TICKS_PER_S
        self.total += amount
        self._count(tick, amount)
        if self.entries and self.entries[-1][0] == tick:
            entry = self.entries[-1]
            entry[1] += amount
            return entry
        entry = [tick, amount, True]
        self.entries.append(entry)
        return entry

    def adjust(self, entry: list[Any], delta: int) -> None:
        """Change an entry's amount (a reservation corrected to actual usage) if it counts."""
        if entry[2]:
            entry[1] += delta
            self.total += delta
            self._count(entry[0], delta)

    def wait(self, amount: int, limit: int, now: float) -> float:
        """Seconds until ``amount`` more fits under ``limit`` (inf if it never can)."""
        if amount > limit:
            return math.inf
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        for t, n, _live in self.entries:
            excess -= n
            if excess <= 0:
                return max(0.0, t + self.span - now)
        return self.span  # not reached: the entries sum to total

    def reset_in(self, now: float) -> float:
        """Seconds until every current entry has left the window."""
        return max(0.0, self.entries[-1][0] + self.span - now) if self.entries else 0.0

    def dump(self) -> list[tuple[float, int]]:
        """The amounts summed into whole seconds (rounded up: a restored window is exact)."""
        return [(float(second), n) for second, n in sorted(self.seconds.items())]


# --- per-key state ------------------------------------------------------------------------------


@dataclass
class Usage:
    """One key's usage in one period: settled amounts plus what admitted requests still hold."""

    period: str
    requests: int = 0
    tokens: int = 0
    images: int = 0
    reserved_tokens: int = 0
    reserved_images: int = 0


@dataclass
class KeyState:
    """A key's state across periods: its minute windows and requests in flight."""

    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    in_flight: int = 0


@dataclass(frozen=True)
class Ask:
    """What a request asks to reserve. ``models`` are the names of its model (id and aliases)."""

    tokens: int = 0
    images: int = 0
    models: tuple[str, ...] = ()


@dataclass
class Hold:
    """What an admitted request holds until it settles."""

    period: str
    tokens: int
    images: int
    token_entry: list[Any] | None = None
    request_entry: list[Any] | None = None  # its slot in the requests window (to void it)


@dataclass(frozen=True)
class Denial:
    """Why a request is refused: ``rate`` is a 429, ``quota`` and ``forbidden`` are 403s."""

    kind: Literal["rate", "quota", "forbidden"]
    message: str
    details: dict[str, Any]
    retry_after: int | None = None


# --- admission and settlement -------------------------------------------------------------------


def check(
    plan_name: str, plan: Plan, state: KeyState, usage: Usage, ask: Ask, now: float
) -> Denial | None:
    """The first limit the request would break, in order: model, quotas, rates, concurrency."""
    if plan.models is not None and ask.models and not set(ask.models) & set(plan.models):
        return Denial(
            "forbidden",
            f"The plan '{plan_name}' does not include the model '{ask.models[0]}'",
            {"plan": plan_name, "model": ask.models[0], "allowed_models": list(plan.models)},
        )
    for what, asked, used, reserved, limit in (
        ("tokens", ask.tokens, usage.tokens, usage.reserved_tokens, plan.tokens_per_month),
        ("images", ask.images, usage.images, usage.reserved_images, plan.images_per_month),
    ):
        if asked and limit is not None and used + reserved + asked > limit:
            return _quota(plan_name, what, used, reserved, limit, asked)
    if plan.requests_per_minute is not None:
        state.requests.prune(now)
        wait = state.requests.wait(1, plan.requests_per_minute, now)
        if wait > 0:
            return _rate(plan_name, "requests_per_minute", plan.requests_per_minute, wait)
    if ask.tokens and plan.tokens_per_minute is not None:
        state.tokens.prune(now)
        wait = state.tokens.wait(ask.tokens, plan.tokens_per_minute, now)
        if math.isinf(wait):
            return Denial(
                "forbidden",
                f"The request needs {ask.tokens} tokens; the plan '{plan_name}' allows "
                f"{plan.tokens_per_minute} per minute",
                {"plan": plan_name, "limit": "tokens_per_minute", "tokens_requested": ask.tokens},
            )
        if wait > 0:
            return _rate(plan_name, "tokens_per_minute", plan.tokens_per_minute, wait)
    if plan.max_concurrent_requests is not None and (
        state.in_flight >= plan.max_concurrent_requests
    ):
        return _rate(plan_name, "max_concurrent_requests", plan.max_concurrent_requests, 1.0)
    return None


def _quota(plan_name: str, what: str, used: int, reserved: int, limit: int, asked: int) -> Denial:
    return Denial(
        "quota",
        "Quota exceeded",
        {
            "plan": plan_name,
            "usage": {f"{what}_used": used, f"{what}_limit": limit},
            # Extensions: why a request is refused before the quota is all spent.
            f"{what}_reserved": reserved,
            f"{what}_requested": asked,
        },
    )


def _rate(plan_name: str, limit_name: str, limit: int, wait: float) -> Denial:
    retry = whole_seconds(wait - 1 / TICKS_PER_S)  # the tick is below a second's resolution
    return Denial(
        "rate",
        "Rate limit exceeded",
        {"retry_after": retry, "plan": plan_name, "limit": limit_name, "limit_value": limit},
        retry,
    )


def take(plan: Plan, state: KeyState, usage: Usage, ask: Ask, now: float) -> Hold:
    """Commit an admission that :func:`check` allowed: slot, concurrency and reservations.

    The minute windows count every request, limited or not, so that a plan edited to add a rate
    limit applies at once to what the key did in the last minute.
    """
    state.requests.prune(now)
    state.tokens.prune(now)
    slot = state.requests.add(now, 1)
    entry = state.tokens.add(now, ask.tokens) if ask.tokens else None
    state.in_flight += 1
    usage.requests += 1
    usage.reserved_tokens += ask.tokens
    usage.reserved_images += ask.images
    return Hold(usage.period, ask.tokens, ask.images, entry, slot)


def admit(
    plan_name: str, plan: Plan, state: KeyState, usage: Usage, ask: Ask, now: float
) -> Hold | Denial:
    """Check every limit and, only if all pass, take everything the request needs."""
    denial = check(plan_name, plan, state, usage, ask, now)
    return denial if denial is not None else take(plan, state, usage, ask, now)


def release(
    state: KeyState | None,
    usage: Usage,
    hold: Hold,
    tokens: int,
    images: int,
    counted: bool = True,
) -> None:
    """Settle a request: its reservation becomes its actual usage.

    Actual usage is counted as reported even if it exceeded the reservation (it cannot when the
    reservation is computed correctly): the record stays truthful. A request not ``counted``
    (void: turned away for capacity, or lost with its ingress) gives its request back too, in
    the period's count and in the minute window.
    """
    usage.reserved_tokens = max(0, usage.reserved_tokens - hold.tokens)
    usage.reserved_images = max(0, usage.reserved_images - hold.images)
    usage.tokens += tokens
    usage.images += images
    if not counted:
        usage.requests = max(0, usage.requests - 1)
    if state is not None:
        state.in_flight = max(0, state.in_flight - 1)
        if hold.token_entry is not None:
            state.tokens.adjust(hold.token_entry, tokens - hold.tokens)
        if not counted and hold.request_entry is not None:
            state.requests.adjust(hold.request_entry, -1)


# --- response headers ---------------------------------------------------------------------------


def headers(
    plan: Plan, state: KeyState, usage: Usage, ask: Ask, now: float, month_end: float | None = None
) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits that apply to this request.

    Requests: the per-minute window. Tokens: the per-minute window when the plan has one, else
    the monthly quota (reset at the period's end). Images (an extension): the monthly quota.
    Concurrent requests (an extension): the plan's ``max_concurrent_requests`` and what is left
    of it with this request in flight.
    """
    out: dict[str, str] = {}
    month_left = (period_end(now) if month_end is None else month_end) - now
    if plan.requests_per_minute is not None:
        state.requests.prune(now)
        limit = plan.requests_per_minute
        _put(out, "requests", limit, limit - state.requests.total, state.requests.reset_in(now))
    if ask.tokens:
        if plan.tokens_per_minute is not None:
            state.tokens.prune(now)
            limit = plan.tokens_per_minute
            _put(out, "tokens", limit, limit - state.tokens.total, state.tokens.reset_in(now))
        elif plan.tokens_per_month is not None:
            limit = plan.tokens_per_month
            left = limit - usage.tokens - usage.reserved_tokens
            _put(out, "tokens", limit, left, month_left)
    if ask.images and plan.images_per_month is not None:
        limit = plan.images_per_month
        left = limit - usage.images - usage.reserved_images
        _put(out, "images", limit, left, month_left)
    if plan.max_concurrent_requests is not None:  # extension: no reset, a request's end frees
        limit = plan.max_concurrent_requests
        out["x-ratelimit-limit-concurrent-requests"] = str(limit)
        out["x-ratelimit-remaining-concurrent-requests"] = str(max(0, limit - state.in_flight))
    return out


def _put(out: dict[str, str], what: str, limit: int, remaining: int, reset_s: float) -> None:
    out[f"x-ratelimit-limit-{what}"] = str(limit)
    out[f"x-ratelimit-remaining-{what}"] = str(max(0, remaining))
    out[f"x-ratelimit-reset-{what}"] = format_reset(reset_s)


def report(plan: Plan, usage: Usage, state: KeyState | None, now: float) -> dict[str, Any]:
    """A key's period usage against each limit (the `usage` command and the actor's view)."""
    rows: dict[str, Any] = {
        "tokens": {
            "used": usage.tokens,
            "reserved": usage.reserved_tokens,
            "limit": plan.tokens_per_month,
        },
        "images": {
            "used": usage.images,
            "reserved": usage.reserved_images,
            "limit": plan.images_per_month,
        },
        "requests": {"used": usage.requests, "limit": None},
    }
    if state is not None:
        state.requests.prune(now)
        state.tokens.prune(now)
        rows["requests_last_minute"] = {
            "used": state.requests.total,
            "limit": plan.requests_per_minute,
        }
        rows["tokens_last_minute"] = {"used": state.tokens.total, "limit": plan.tokens_per_minute}
        rows["in_flight"] = {"used": state.in_flight, "limit": plan.max_concurrent_requests}
    return {"period": usage.period, "resets_at": period_end(now), "limits": rows}
