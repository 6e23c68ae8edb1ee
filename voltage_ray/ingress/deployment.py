"""The Ingress deployment: owns the FastAPI app and the handles of every model deployment.

It checks keys itself, against a copy of the key store it keeps fresh (``limits/keyring.py``):
a request with a missing, malformed or unknown key costs no remote call, and failed
authentications are throttled per client address. Admission and settlement go to the shared
limiter; settlements are delivered before the response's last byte (``settlement.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve

from voltage_ray.backends.fairness import let_in
from voltage_ray.config import AppConfig, EmbeddingSettings, ModelConfig, ModelKind
from voltage_ray.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
    VoltageError,
    shown,
)
from voltage_ray.ingress.api import create_api
from voltage_ray.ingress.auth import client_address, presented_key
from voltage_ray.ingress.coalesce import Coalescer
from voltage_ray.ingress.response_runs import BackgroundRuns
from voltage_ray.ingress.services import Runs, Ticket
from voltage_ray.ingress.settlement import REQUEST, SettleBeforeLastByte
from voltage_ray.limits.client import LimiterClient, get_or_create_limiter
from voltage_ray.limits.idempotency import (
    Answer,
    InProgress,
    Replay,
    Replayed,
    max_answer_bytes,
    valid_key,
)
from voltage_ray.limits.keyring import Failure, KeyRing
from voltage_ray.limits.limiter import Principal
from voltage_ray.limits.throttle import FailureThrottle
from voltage_ray.metrics import IngressMetrics
from voltage_ray.protocol.common import set_unknown_fields

logger = logging.getLogger(__name__)

READY_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})
STATUS_REFRESH_S = 1.0  # how often a background task refreshes the view of Serve's state
KEY_MISS_SYNC_S = 0.25  # an unknown key id syncs the keys at most this often
STATUS_STALE_S = 5.0  # an older view is refreshed before it is used
ROUTABLE_POLL_S = 0.25  # how often a try waiting for a replica asks Serve again
INPUTS_PER_SHARED_CALL = 256  # embeddings inputs one shared call carries at most


class Ingress:
    """Routes requests to model deployments (the routes see it as :class:`Services`).
    Undecorated; the builder wraps it for Serve."""

    async def __init__(
        self,
        config: dict[str, Any],
        handles: dict[str, Any],
        deployment_names: dict[str, str],
    ) -> None:
        self.config = AppConfig.model_validate(config)
        set_unknown_fields(self.config.ingress.unknown_fields)  # for this replica's requests
        self.handles = handles  # model id -> DeploymentHandle
        self.deployment_names = deployment_names  # model id -> Serve deployment name
        self.by_name: dict[str, ModelConfig] = {
            name: m for m in self.config.models for name in m.names
        }
        self.by_id: dict[str, ModelConfig] = {m.id: m for m in self.config.models}
        self.metrics = IngressMetrics()
        assert self.config.database and self.config.plans
        self.limits = self.config.limits
        options = self.limits.model_dump(
            include={
                "flush_interval_s",
                "reservation_ttl_s",
                "idempotency_ttl_s",
                "idempotency_max_mb",
            }
        )
        limiter_args = (self.config.database, self.config.plans, options)
        self.limiter = LimiterClient(
            lambda: get_or_create_limiter(
                *limiter_args, self.limits.node_resource, self.limits.actor_name
            ),
            timeout_s=self.limits.timeout_s,
            owner=replica_owner(),
        )
        await self.limiter.call("configure", *limiter_args, timeout_s=60)
        self.keys = KeyRing()
        await self.limiter.sync_keys(self.keys)  # serve with every key known
        self._following: asyncio.Task[None] | None = None
        self._catching_up: asyncio.Future[None] | None = None
        self._caught_at = 0.0
        self._follow_keys()
        auth = self.config.auth
        self.trusted_proxies = auth.networks()
        self.throttle = (
            FailureThrottle(auth.failures_per_minute) if auth.failures_per_minute else None
        )
        self._slowed = 0  # throttled failures waiting before their 429
        self._max_slowed = max(1, self.config.ingress.deployment.max_ongoing_requests // 4)
        self._status_cache: tuple[float, dict[str, tuple[bool, int]]] | None = None
        self._status_refresh: asyncio.Task[dict[str, tuple[bool, int]]] | None = None
        self._status_watch: asyncio.Task[None] | None = None
        self._status_forgotten = 0.0  # when forget_readiness() last ran
        self._coalescers: dict[str, Coalescer] = {}
        self._occupied: dict[str, collections.Counter[str]] = {
            m.id: collections.Counter() for m in self.config.models
        }  # model id -> requests let in, per API key
        self.responses = self.limiter.responses  # stored responses, in the database
        owner = replica_owner()
        self.runs: Runs = BackgroundRuns(self, owner[0] if owner else f"process-{os.getpid()}")
        self.runs.sweep()  # take over the background responses of replicas that died

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_api(self)
        # NOTE: added last, so outermost: it sees the final status and the body's last byte.
        kept = max_answer_bytes(self.limits.idempotency_max_mb)  # the limiter keeps no larger
        app.add_middleware(SettleBeforeLastByte, deliver=self.deliver, max_answer_bytes=kept)
        return app

    async def authenticate(self, request: Request) -> Principal:
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
            task = self._catching_up = asyncio.ensure_future(self.limiter.sync_keys(self.keys))
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
            self._following = loop.create_task(self.limiter.follow_keys(self.keys))

    async def admit(
        self, principal: Principal, *, endpoint: str, model: str, tokens: int = 0, images: int = 0
    ) -> Ticket:
        """Phase one: take a request slot and reserve what the request can at most use.

        One limiter round trip (shared with concurrent admissions); a refusal raises its
        429/403, an unreachable limiter a 503. ``ticket.headers`` are the x-ratelimit-* headers.
        """
        tokens, images = max(0, int(tokens)), max(0, int(images))
        if not self.limits.enabled:
            return Ticket(principal, endpoint, model, tokens, images)
        config = self.by_name.get(model)
        names = tuple(config.names) if config else (model,)
        request = REQUEST.get()
        idem = None
        if request is not None and request.idempotency_key is not None and not request.tickets:
            if not valid_key(request.idempotency_key):
                raise BadRequest(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                    details={"param": "Idempotency-Key"},
                )
            idem = (request.idempotency_key, request.fingerprint())
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
        if request is None:
            ticket.in_request = False
        else:
            request.tickets.append(ticket)
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

    async def settle(self, ticket: Ticket, *, tokens: int = 0, images: int = 0) -> None:
        """Phase two: record what the request used. It reaches the limiter (which releases the
        rest of the reservation) before the response's last byte leaves; a response that is an
        error bills nothing (SettleBeforeLastByte)."""
        ticket.used = (max(0, int(tokens)), max(0, int(images)))
        if not ticket.in_request:
            await self.deliver([ticket], 200, wait=False)

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

    async def __del__(self) -> None:
        """Graceful shutdown: deliver queued settlements, then have the limiter write usage."""
        try:
            await self.limiter.drain()
            await self.limiter.call("flush")
        except Exception as exc:  # shutting down: report, never raise
            logger.warning("limiter flush at shutdown failed: %r", exc)

    @asynccontextmanager
    async def metered(
        self, principal: Principal, *, endpoint: str, model: str, tokens: int = 0, images: int = 0
    ) -> AsyncIterator[Ticket]:
        """admit ... settle: the block records actual usage with :meth:`settle`; the response
        delivers it (an exception's error response bills nothing)."""
        yield await self.admit(
            principal, endpoint=endpoint, model=model, tokens=tokens, images=images
        )

    def resolve(self, name: str, kind: ModelKind) -> Any:
        """The handle of the ``kind`` model called ``name`` (id or alias), else 404."""
        model = self.by_name.get(name)
        if model is None or model.kind != kind:
            available = sorted(n for m in self.config.models if m.kind == kind for n in m.names)
            what = "does not exist" if model is None else f"is not one of the {kind} models"
            raise NotFound(
                f"The model '{shown(name)}' {what}. Available {kind} models: "
                + ", ".join(available),
                details={"available_models": available},
            )
        return self.handles[model.id]

    def embedder(self, name: str) -> Coalescer:
        """The shared calls to the embeddings model called ``name`` (id or alias), else 404."""
        handle = self.resolve(name, "embeddings")
        model = self.by_name[name]
        coalescer = self._coalescers.get(model.id)
        if coalescer is None:
            settings = model.embeddings or EmbeddingSettings()
            coalescer = self._coalescers[model.id] = Coalescer(
                handle.embed_many.remote,
                max_in_flight=settings.ingress_calls_in_flight,
                max_wait_s=settings.ingress_call_wait_s,
                max_weight=INPUTS_PER_SHARED_CALL,
            )
        return coalescer

    async def occupy(self, model: ModelConfig, key: str) -> bool:
        """Take the request's place among those ``model`` may hold at once at this replica:
        what its running replicas take (max_ongoing_requests each) plus its queue
        (max_queued_requests). When they are full, only a key holding less than its fair share
        of them (the places over the keys holding some) is let in: the replicas' own fair
        queues then decide whose request gives way (``backends/fairness.py``). False: the
        model is at capacity for ``key``. Held until the response ends, across all of the
        request's calls (chat: tokenize, then generate), so a request let in is not refused
        half way. Embeddings calls carry many requests: the replica's queue alone bounds them."""
        queued = model.deployment.max_queued_requests
        request = REQUEST.get()
        if request is None or model.id in request.places or model.kind == "embeddings":
            return True
        held = self._occupied[model.id]
        if queued is not None and queued >= 0:
            _, running = (await self._status()).get(model.id, (False, 0))
            if not let_in(held, key, model.deployment.max_ongoing_requests * running + queued):
                return False
        held[key] += 1

        def release() -> None:
            held[key] -= 1
            if held[key] <= 0:
                del held[key]

        request.places[model.id] = release
        return True

    def default_model(self, kind: ModelKind) -> ModelConfig | None:
        return next((m for m in self.config.models if m.kind == kind), None)

    async def readiness(self) -> dict[str, bool]:
        """Per model id: is its deployment healthy with a running replica? (Serve's view.)"""
        return {model_id: ready for model_id, (ready, _) in (await self._status()).items()}

    async def _status(self) -> dict[str, tuple[bool, int]]:
        """Per model id: (healthy, running replicas), from the view a background task refreshes
        every STATUS_REFRESH_S (so /health stays one step of the event loop, even while the
        replica is swamped). Past STATUS_STALE_S, or after a failure, the caller waits for a
        refresh; concurrent callers share one.

        NOTE: never refreshed on a request's path when fresh: ``serve.status()`` costs this
        process and the controller about 20 ms of CPU, and started by the first request after
        an idle second it held up that request's first token by as much (measured on 2 cores:
        the ingress's share of a stream's TTFT fell from ~35 to ~15 ms without it)."""
        self._watch_status()
        cached = self._status_cache
        age = time.monotonic() - cached[0] if cached else math.inf
        if cached is not None and age < STATUS_STALE_S:
            return cached[1]
        return await self._refresh_status()

    def _refresh_status(self) -> asyncio.Future[dict[str, tuple[bool, int]]]:
        if self._status_refresh is None or self._status_refresh.done():
            self._status_refresh = asyncio.create_task(self._read_status())
        return asyncio.shield(self._status_refresh)

    def _watch_status(self) -> None:
        """Keep the view fresh, from the loop requests run on (as :meth:`_follow_keys`)."""
        task, loop = self._status_watch, asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._status_watch = loop.create_task(self._status_loop())

    async def _status_loop(self) -> None:
        while True:
            try:
                await self._refresh_status()
            except Exception:  # the controller unavailable: callers wait for it when stale
                logger.warning("reading Serve's status failed; retrying", exc_info=True)
            await asyncio.sleep(STATUS_REFRESH_S)

    async def _read_status(self) -> dict[str, tuple[bool, int]]:
        started = time.monotonic()
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(app_name)
        found: dict[str, tuple[bool, int]] = {}
        for model in self.config.models:
            dep = app.deployments.get(self.deployment_names[model.id]) if app else None
            running = dep.replica_states.get("RUNNING", 0) if dep else 0
            found[model.id] = (bool(dep and dep.status in READY_STATES and running > 0), running)
        if started >= self._status_forgotten:  # else read before a failure: the next one counts
            self._status_cache = (time.monotonic(), found)
        return found

    def forget_readiness(self) -> None:
        """After a replica failed: the next readiness() asks Serve again."""
        self._status_cache = self._status_refresh = None
        self._status_forgotten = time.monotonic()

    async def routable(self, model: ModelConfig) -> bool:
        """May a call to ``model`` be sent? Yes once it has a running replica, waiting up to its
        ``replica_wait_s`` for one (Serve restarts failed replicas); yes at once for a model that
        may scale to zero (the call makes Serve start one)."""
        scaling = model.deployment.autoscaling_config
        if scaling is not None and scaling.min_replicas == 0:
            return True
        deadline = time.monotonic() + model.replica_wait_s
        while True:
            _, running = (await self._status()).get(model.id, (False, 0))
            if running > 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(ROUTABLE_POLL_S)
            self.forget_readiness()

    def observe_failover(self, model_id: str, error: str) -> None:
        self.metrics.failovers.inc(tags={"model": model_id, "error": error})

    def observe_overload(self, model_id: str, reason: str) -> None:
        self.metrics.overloaded.inc(tags={"model": model_id, "reason": reason})


SERVE_NAMESPACE = "serve"  # where Serve names its replica actors (not the job's namespace)


def replica_owner() -> tuple[str, Any, str] | None:
    """(actor id, actor handle, ``namespace/name``) of the replica this runs in, for the
    limiter (which finds it again by that name after a restart); None outside an actor."""
    context = ray.get_runtime_context()
    actor_id = context.get_actor_id()
    if not actor_id:
        return None
    name = context.get_actor_name() or ""
    return (actor_id, context.current_actor, f"{SERVE_NAMESPACE}/{name}" if name else "")


def rejection_reason(refused: VoltageError) -> str:
    """The limiter's refusal as a metric tag: rate, quota, concurrency or forbidden."""
    if isinstance(refused, QuotaExceeded):
        return "quota"
    if isinstance(refused, RateLimited):
        concurrency = refused.details.get("limit") == "max_concurrent_requests"
        return "concurrency" if concurrency else "rate"
    return "forbidden"
