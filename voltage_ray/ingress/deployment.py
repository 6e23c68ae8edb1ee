"""The Ingress deployment: owns the FastAPI app and the handles of every model deployment."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from voltage_ray.config import AppConfig, EmbeddingSettings, ModelConfig, ModelKind
from voltage_ray.errors import (
    Forbidden,
    NotFound,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
    VoltageError,
)
from voltage_ray.ingress.api import create_api
from voltage_ray.ingress.auth import presented_key
from voltage_ray.ingress.coalesce import Coalescer
from voltage_ray.limits.client import LimiterClient, get_or_create_limiter
from voltage_ray.limits.limiter import Grant, Principal
from voltage_ray.metrics import IngressMetrics

logger = logging.getLogger(__name__)

READY_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})
STATUS_CACHE_S = 1.0
ROUTABLE_POLL_S = 0.25  # how often a try waiting for a replica asks Serve again
INPUTS_PER_SHARED_CALL = 256  # embeddings inputs one shared call carries at most


@dataclass
class Ticket:
    """One admitted request: what it reserved, and the headers its response carries."""

    principal: Principal
    endpoint: str
    model: str
    reserved_tokens: int = 0
    reserved_images: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    grant: Grant | None = None  # None when limits are disabled


class Ingress:
    """Routes requests to model deployments. Undecorated; the builder wraps it for Serve."""

    async def __init__(
        self,
        config: dict[str, Any],
        handles: dict[str, Any],
        deployment_names: dict[str, str],
    ) -> None:
        self.config = AppConfig.model_validate(config)
        self.handles = handles  # model id -> DeploymentHandle
        self.deployment_names = deployment_names  # model id -> Serve deployment name
        self.by_name: dict[str, ModelConfig] = {
            name: m for m in self.config.models for name in m.names
        }
        self.by_id: dict[str, ModelConfig] = {m.id: m for m in self.config.models}
        self.metrics = IngressMetrics()
        assert self.config.database and self.config.plans
        self.limits = self.config.limits
        options = self.limits.model_dump(include={"flush_interval_s", "reservation_ttl_s"})
        limiter_args = (self.config.database, self.config.plans, options)
        self.limiter = LimiterClient(
            lambda: get_or_create_limiter(*limiter_args, self.limits.node_resource),
            timeout_s=self.limits.timeout_s,
        )
        await self.limiter.call("configure", *limiter_args, timeout_s=60)
        self._status_cache: tuple[float, dict[str, tuple[bool, int]]] | None = None
        self._status_refresh: asyncio.Task[dict[str, tuple[bool, int]]] | None = None
        self._coalescers: dict[str, Coalescer] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def authenticate(self, request: Request) -> Principal:
        """The caller, or Unauthorized. Answers are cached briefly per replica."""
        key_id, key_hash = presented_key(request)
        principal = await self.limiter.authenticate(key_id, key_hash)
        if principal is None:
            raise Unauthorized()
        request.state.principal = principal
        return principal

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
        try:
            grant = await self.limiter.admit(principal.key_id, names, tokens, images)
        except (RateLimited, QuotaExceeded, Forbidden) as refused:
            self.metrics.rejections.inc(
                tags={"reason": rejection_reason(refused), "plan": principal.plan}
            )
            raise
        return Ticket(principal, endpoint, model, tokens, images, grant.headers, grant=grant)

    async def settle(self, ticket: Ticket, *, tokens: int = 0, images: int = 0) -> None:
        """Phase two: account what was used and release the rest. Idempotent, never blocks:
        the settlement is queued and delivered (with retries) by the limiter client."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.grant is not None:
            self.limiter.settle(ticket.grant, max(0, int(tokens)), max(0, int(images)))

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
        """admit ... settle; the block settles actual usage, an exit without it settles zero."""
        ticket = await self.admit(
            principal, endpoint=endpoint, model=model, tokens=tokens, images=images
        )
        try:
            yield ticket
        finally:
            if not ticket.settled:
                await asyncio.shield(self.settle(ticket))

    def resolve(self, name: str, kind: ModelKind) -> Any:
        """The handle of the ``kind`` model called ``name`` (id or alias), else 404."""
        model = self.by_name.get(name)
        if model is None or model.kind != kind:
            available = sorted(n for m in self.config.models if m.kind == kind for n in m.names)
            what = "does not exist" if model is None else f"is not one of the {kind} models"
            raise NotFound(
                f"The model '{name}' {what}. Available {kind} models: {', '.join(available)}",
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

    def default_model(self, kind: ModelKind) -> ModelConfig | None:
        return next((m for m in self.config.models if m.kind == kind), None)

    async def readiness(self) -> dict[str, bool]:
        """Per model id: is its deployment healthy with a running replica? (Serve's view.)"""
        return {model_id: ready for model_id, (ready, _) in (await self._status()).items()}

    async def _status(self) -> dict[str, tuple[bool, int]]:
        """Per model id: (healthy, running replicas), at most STATUS_CACHE_S old; concurrent
        callers share one refresh."""
        now = time.monotonic()
        if self._status_cache and now - self._status_cache[0] < STATUS_CACHE_S:
            return self._status_cache[1]
        if self._status_refresh is None or self._status_refresh.done():
            self._status_refresh = asyncio.create_task(self._read_status())
        return await asyncio.shield(self._status_refresh)

    async def _read_status(self) -> dict[str, tuple[bool, int]]:
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(app_name)
        found: dict[str, tuple[bool, int]] = {}
        for model in self.config.models:
            dep = app.deployments.get(self.deployment_names[model.id]) if app else None
            running = dep.replica_states.get("RUNNING", 0) if dep else 0
            found[model.id] = (bool(dep and dep.status in READY_STATES and running > 0), running)
        self._status_cache = (time.monotonic(), found)
        return found

    def forget_readiness(self) -> None:
        """After a replica failed: the next readiness() asks Serve again."""
        self._status_cache = None

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


def rejection_reason(refused: VoltageError) -> str:
    """The limiter's refusal as a metric tag: rate, quota, concurrency or forbidden."""
    if isinstance(refused, QuotaExceeded):
        return "quota"
    if isinstance(refused, RateLimited):
        concurrency = refused.details.get("limit") == "max_concurrent_requests"
        return "concurrency" if concurrency else "rate"
    return "forbidden"
