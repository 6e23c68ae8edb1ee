"""Failed authentications per client address: a token bucket each, in one ingress replica.

An address may fail ``per_minute`` times in a burst, then once every ``60 / per_minute`` seconds;
past that its failures are answered 429 with how long to wait instead of 401. Only failures
count and only failures are refused: a valid key from the same address (a NAT, a proxy that
forwards no address) is never throttled. Pure arithmetic, no clock of its own (``now`` is
passed in), bounded memory: past ``max_addresses`` the buckets that have refilled are
forgotten (all of them, if an attack spread over more addresses keeps most of them busy).
"""

from __future__ import annotations

import math

MAX_ADDRESSES = 100_000


class FailureThrottle:
    def __init__(self, per_minute: int, max_addresses: int = MAX_ADDRESSES) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens regained per second
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, as of)

    def __len__(self) -> int:
        return len(self._buckets)

    def fail(self, address: str, now: float) -> int:
        """Count a failure from ``address``: 0 if it may be answered (401), else the whole
        seconds until it may fail again (429, Retry-After); a refused failure takes nothing."""
        tokens, since = self._buckets.get(address, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - since) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))
        if address not in self._buckets and len(self._buckets) >= self.max_addresses:
            self._forget(now)
        self._buckets[address] = (tokens - 1.0, now)
        return 0

    def _forget(self, now: float) -> None:
        """Drop the buckets that are full again (they hold nothing); all of them when that
        frees under a tenth (so a full table costs one scan per many new addresses)."""
        full = [
            a
            for a, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * self.rate >= self.capacity
        ]
        if len(full) < self.max_addresses // 10:
            self._buckets.clear()
        for address in full:
            self._buckets.pop(address, None)
