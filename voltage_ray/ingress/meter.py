"""Metering: what a request is admitted for by the shared limiter, what it used, and delivery of
that usage (two-phase: reserve before the model call, settle after it).

:class:`Admissions` is the replica's side (one per Ingress replica): the limiter round trips.
:class:`Meter` is one request's (made per HTTP request by ``settlement.SettleBeforeLastByte``,
which delivers it before the response's last byte; handed to the routes with
``Depends(deps.get_meter)``): the routes :meth:`Meter.admit`, then :meth:`Meter.record` what was
used. A meter made apart from any request (a background response's run) delivers what it
records at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voltage_ray.backends.fairness import Tenant
from voltage_ray.config import AppConfig
from voltage_ray.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    VoltageError,
)
from voltage_ray.limits.client import LimiterClient
from voltage_ray.limits.idempotency import Answer, InProgress, Replay, Replayed, valid_key
from voltage_ray.limits.limiter import Grant, Principal
from voltage_ray.metrics import IngressMetrics

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One admitted request: what it reserved, used, and the headers its response carries."""

    principal: Principal
    endpoint: str
    model: str
    reserved_tokens: int = 0
    reserved_images: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False  # sent to the limiter
    grant: Grant | None = None  # None when limits are disabled
    used: tuple[int, int] = (0, 0)  # tokens, images: recorded by Meter.record
    idempotent: bool = False  # admitted with the request's Idempotency-Key

    def tenant(self, service_tier: str | None = None) -> Tenant:
        """Whose request this is, for the model replicas' fair scheduling: the API key and its
        plan's priority; OpenAI's ``service_tier: flex`` asks for less (one level lower), and no
        tier raises a key above its plan."""
        priority = self.grant.priority if self.grant is not None else 0
        if service_tier == "flex":
            priority -= 1
        return Tenant(self.principal.key_id, priority, self.principal.plan)


class Admissions:
    """The replica's link to the shared limiter: admissions and the delivery of settlements."""

    def __init__(self, config: AppConfig, limiter: LimiterClient, metrics: IngressMetrics) -> None:
        self.config = config
        self.limits = config.limits
        self.limiter = limiter
        self.metrics = metrics
        self.names = {name: tuple(m.names) for m in config.models for name in m.names}

    async def admit(
        self,
        principal: Principal,
        *,
        endpoint: str,
        model: str,
        tokens: int,
        images: int,
        idem: tuple[str, str] | None,
    ) -> Ticket:
        """Take a request slot and reserve what the request can at most use: one limiter round
        trip (shared with concurrent admissions); a refusal raises its 429/403, an unreachable
        limiter a 503. ``idem``: the request's Idempotency-Key and fingerprint (a repeat of an
        answered request raises ``Replayed``)."""
        tokens, images = max(0, int(tokens)), max(0, int(images))
        if not self.limits.enabled:
            return Ticket(principal, endpoint, model, tokens, images)
        names = self.names.get(model, (model,))
        waited_s = 0.0
        while True:
            try:
                grant = await self.limiter.admit(principal.key_id, names, tokens, images, idem)
            except (RateLimited, QuotaExceeded, Forbidden) as refused:
                self.metrics.rejections.inc(
                    tags={"reason": rejection_reason(refused), "plan": principal.plan}
                )
                raise
            if not isinstance(grant, InProgress):
                break
            assert idem is not None
            waited_s = await self._wait_answer(principal.key_id, idem[0], waited_s)
        if isinstance(grant, Replay):  # a repeat of an answered request: its answer again
            raise Replayed(grant.answer)
        ticket = Ticket(principal, endpoint, model, tokens, images, grant.headers, grant=grant)
        ticket.idempotent = idem is not None
        return ticket

    async def _wait_answer(self, key_id: str, key: str, waited_s: float) -> float:
        """Wait for the running first attempt of an Idempotency-Key (a 409 past the longest
        a request may run); the seconds waited so far."""
        limit = self.config.request_limits.chat_timeout_s
        if waited_s >= limit:
            raise Conflict(
                "A request with this Idempotency-Key is still in progress; retry later",
                details={"param": "Idempotency-Key"},
                headers={"Retry-After": "1"},
            )
        step = min(limit - waited_s, 30.0)
        started = time.monotonic()
        await self.limiter.call("wait_answer", key_id, key, step, timeout_s=step + 5.0)
        return waited_s + time.monotonic() - started

    async def deliver(
        self, tickets: list[Ticket], status: int, wait: bool, answer: Answer | None = None
    ) -> None:
        """Send the settlements of ``tickets`` not sent yet, for a response of ``status`` (0:
        none was sent): a success or no response bills what was recorded, an error nothing,
        and a 503 gives the request back too. ``wait``: until the limiter has them (at most
        ``limits.timeout_s``; past it they stay queued, and the response goes on). ``answer``:
        the whole response, kept for repeats of the request's Idempotency-Key."""
        sent: list[asyncio.Future[bool]] = []
        for ticket in tickets:
            if ticket.settled:
                continue
            ticket.settled = True
            if ticket.grant is None:
                continue
            tokens, images = ticket.used if status < 400 else (0, 0)
            kept = answer if ticket.idempotent else None
            sent.append(
                self.limiter.settle(ticket.grant, tokens, images, status != 503, answer=kept)
            )
        if wait and sent:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*sent)), self.limits.timeout_s)
            except asyncio.TimeoutError:
                logger.warning("limiter unavailable: answering before %d settlement(s)", len(sent))


class Meter:
    """One request's metering: its admissions (delivered by the response, or at once for a
    meter apart from any request), and the places it holds among what a model may take at
    once (``Models.occupy``; given back when it ends)."""

    def __init__(self, admissions: Admissions, *, in_request: bool = True) -> None:
        self.admissions = admissions
        self.in_request = in_request  # delivered by SettleBeforeLastByte (else at record)
        self.tickets: list[Ticket] = []
        self.places: dict[str, Callable[[], None]] = {}  # model id -> release
        self.idempotency_key: str | None = None  # the header's value, as sent
        self.digest: Any = None  # sha256 of the method, path and body (with an Idempotency-Key)

    def apart(self) -> Meter:
        """A meter for work that outlives this request (a background run)."""
        return Meter(self.admissions, in_request=False)

    def keyed(self, key: str, method: str, path: str) -> None:
        """The request carries an Idempotency-Key: its first admission is fingerprinted."""
        self.idempotency_key = key
        self.digest = hashlib.sha256(f"{method} {path}\n".encode())

    def fingerprint(self) -> str:
        """The request as read so far (all of it, once its route parsed the body)."""
        return self.digest.hexdigest() if self.digest is not None else ""

    async def admit(
        self, principal: Principal, *, endpoint: str, model: str, tokens: int = 0, images: int = 0
    ) -> Ticket:
        """Phase one: reserve what the request can at most use (``Admissions.admit``);
        ``ticket.headers`` are the x-ratelimit-* headers."""
        idem = None
        if self.idempotency_key is not None and not self.tickets:
            if not valid_key(self.idempotency_key):
                raise BadRequest(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                    details={"param": "Idempotency-Key"},
                )
            idem = (self.idempotency_key, self.fingerprint())
        ticket = await self.admissions.admit(
            principal, endpoint=endpoint, model=model, tokens=tokens, images=images, idem=idem
        )
        if self.in_request and ticket.grant is not None:
            self.tickets.append(ticket)
        return ticket

    async def record(self, ticket: Ticket, *, tokens: int = 0, images: int = 0) -> None:
        """Phase two: what the request used. It reaches the limiter (which releases the rest of
        the reservation) before the response's last byte leaves; a response that is an error
        bills nothing. A meter apart from a request delivers it now."""
        ticket.used = (max(0, int(tokens)), max(0, int(images)))
        if not self.in_request:
            await self.admissions.deliver([ticket], 200, wait=False)

    async def deliver(self, status: int, wait: bool, answer: Answer | None = None) -> None:
        """Settle this request's admissions for a response of ``status``
        (``Admissions.deliver``)."""
        await self.admissions.deliver(self.tickets, status, wait, answer)

    def release(self) -> None:
        """Give back the places the request held at models (its response ended)."""
        for release in self.places.values():
            release()
        self.places.clear()


METER = "voltage.meter"  # the scope key the middleware keeps a request's Meter under


def rejection_reason(refused: VoltageError) -> str:
    """The limiter's refusal as a metric tag: rate, quota, concurrency or forbidden."""
    if isinstance(refused, QuotaExceeded):
        return "quota"
    if isinstance(refused, RateLimited):
        concurrency = refused.details.get("limit") == "max_concurrent_requests"
        return "concurrency" if concurrency else "rate"
    return "forbidden"
