"""Who is calling: the key presented (`X-VoltageGPU-Key` or `Authorization: Bearer`) and the
client address that failed authentications are throttled by.

:class:`Auth` checks keys in this process, against a copy of the key store it keeps fresh
(``limits/keyring.py``): a request with a missing, malformed or unknown key costs no remote
call, and failed authentications are throttled per client address. The key is never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request

from voltage_ray.config import AppConfig
from voltage_ray.errors import RateLimited, Unauthorized, VoltageError
from voltage_ray.limits.client import LimiterClient, detached
from voltage_ray.limits.keyring import Failure, KeyRing
from voltage_ray.limits.limiter import Principal
from voltage_ray.limits.throttle import FailureThrottle
from voltage_ray.metrics import IngressMetrics

KEY_HEADER = "x-voltagegpu-key"
FORWARDED_HEADER = b"x-forwarded-for"
MAX_ADDRESS_CHARS = 64  # a forwarded address is the client's word: bounded before it is kept
KEY_MISS_SYNC_S = 0.25  # an unknown key id syncs the keys at most this often

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Auth:
    """The callers' keys (a :class:`KeyRing` kept in step with the key store through the
    limiter) and the throttle of failed authentications."""

    def __init__(self, config: AppConfig, limiter: LimiterClient, metrics: IngressMetrics) -> None:
        self.config = config
        self.limiter = limiter
        self.metrics = metrics
        self.keys = KeyRing()
        self._following: asyncio.Task[None] | None = None
        self._catching_up: asyncio.Future[None] | None = None
        self._caught_at = 0.0
        auth = config.auth
        self.trusted_proxies = auth.networks()
        self.throttle = (
            FailureThrottle(auth.failures_per_minute) if auth.failures_per_minute else None
        )
        self._slowed = 0  # throttled failures waiting before their 429
        self._max_slowed = max(1, config.ingress.deployment.max_ongoing_requests // 4)

    async def start(self) -> None:
        """Serve with every key known, and keep them fresh."""
        await self.limiter.sync_keys(self.keys)
        self._follow_keys()

    async def caller(self, request: Request) -> Principal:
        """The caller, checked in this replica (no remote call); else a 401, or a 429 once the
        client's address has failed too often."""
        self._follow_keys()
        key = presented_key(request)
        principal, failure = self.keys.verify(key)
        if failure == "unknown" and await self._caught_up():  # a key created a moment ago
            principal, failure = self.keys.verify(key)
        if principal is None:
            raise await self._refusal(request, failure or "missing")
        request.state.principal = principal
        return principal

    async def _refusal(self, request: Request, failure: Failure) -> VoltageError:
        """401, or 429 once the client's address failed too often: answered after
        ``auth.throttled_delay_s`` (a flood from a few connections then costs next to nothing),
        unless too many already wait."""
        wait = 0
        if self.throttle is not None:
            address = client_address(request.scope, self.trusted_proxies)
            wait = self.throttle.fail(address, time.monotonic())
        status = "429" if wait else "401"
        self.metrics.auth_failures.inc(tags={"reason": failure, "status": status})
        if not wait:
            return Unauthorized()
        if self._slowed < self._max_slowed:
            self._slowed += 1
            try:
                await asyncio.sleep(self.config.auth.throttled_delay_s)
            finally:
                self._slowed -= 1
        limit = self.config.auth.failures_per_minute
        return RateLimited(
            "Too many failed authentications from this address; retry later",
            details={
                "retry_after": wait,
                "limit": "auth_failures_per_minute",
                "limit_value": limit,
            },
            headers={"Retry-After": str(wait)},
        )

    async def _caught_up(self) -> bool:
        """Sync the keys now for an unknown id, so a key created a moment ago works at once:
        at most once per KEY_MISS_SYNC_S, one sync shared by every miss meanwhile (a flood of
        invented ids costs the limiter a few cheap change-log reads a second, never a key
        lookup or an admission). Whether a sync ran for this caller."""
        task, now = self._catching_up, time.monotonic()
        if task is None or (task.done() and now - self._caught_at >= KEY_MISS_SYNC_S):
            self._caught_at = now
            task = self._catching_up = detached(self.limiter.sync_keys(self.keys))
        elif task.done():
            return False
        try:
            await asyncio.shield(task)
        except Exception:  # the limiter unavailable: the copy in hand answers
            return False
        return True

    def _follow_keys(self) -> None:
        """Keep the keys fresh, from the loop requests run on (started with the replica; started
        again here if that task ended or runs on another loop)."""
        task, loop = self._following, asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._following = detached(self.limiter.follow_keys(self.keys))


def presented_key(request: Request) -> str:
    """The key sent with the request, or "" when none was."""
    key = request.headers.get(KEY_HEADER, "").strip()
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    return key


def client_address(scope: Mapping[str, Any], trusted: Sequence[Network]) -> str:
    """The address of the client that sent the request.

    The peer, unless it is a trusted proxy: then the nearest address of ``X-Forwarded-For``
    (read right to left) that is not itself a trusted proxy. A client cannot choose its address
    this way: an untrusted peer's header is ignored, and a trusted proxy appends the address it
    saw after whatever the client wrote.
    """
    client = scope.get("client")
    address = str(client[0]) if client else ""
    if not _trusted(address, trusted):
        return address[:MAX_ADDRESS_CHARS]
    hops = [
        hop.strip()
        for name, value in scope.get("headers") or ()
        if name == FORWARDED_HEADER
        for hop in value.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, trusted):
            break
    return address[:MAX_ADDRESS_CHARS]


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
