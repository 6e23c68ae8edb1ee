"""The Ingress deployment: owns the FastAPI app and the handles of every model deployment.

It builds the collaborators the routes are handed (``deps.py``): :class:`~.auth.Auth` (the
callers' keys), :class:`~.served_models.Models` (the models, their readiness and capacity),
:class:`~.meter.Admissions` (the shared limiter, behind each request's ``Meter``), the stored
responses and the background runs. Settlements are delivered before the response's last byte
(``settlement.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from fastapi import FastAPI

from voltage_ray.config import AppConfig
from voltage_ray.ingress.api import create_api
from voltage_ray.ingress.auth import Auth
from voltage_ray.ingress.meter import Admissions
from voltage_ray.ingress.response_runs import BackgroundRuns
from voltage_ray.ingress.served_models import Models
from voltage_ray.limits.client import LimiterClient, get_or_create_limiter
from voltage_ray.metrics import IngressMetrics
from voltage_ray.protocol.common import set_unknown_fields

logger = logging.getLogger(__name__)


class Ingress:
    """Routes requests to model deployments. Undecorated; ``builder.py`` wraps it for Serve."""

    async def __init__(
        self,
        config: dict[str, Any],
        handles: dict[str, Any],
        deployment_names: dict[str, str],
    ) -> None:
        self.config = AppConfig.model_validate(config)
        set_unknown_fields(self.config.ingress.unknown_fields)  # for this replica's requests
        self.metrics = IngressMetrics()
        assert self.config.database and self.config.plans
        limits = self.config.limits
        options = limits.model_dump(
            include={
                "flush_interval_s",
                "reservation_ttl_s",
                "idempotency_ttl_s",
                "idempotency_max_mb",
            }
        )
        limiter_args = (self.config.database, self.config.plans, options)
        self.limiter = LimiterClient(
            lambda: get_or_create_limiter(*limiter_args, limits.node_resource, limits.actor_name),
            timeout_s=limits.timeout_s,
            owner=replica_owner(),
        )
        await self.limiter.call("configure", *limiter_args, timeout_s=60)
        self.auth = Auth(self.config, self.limiter, self.metrics)
        await self.auth.start()  # serve with every key known
        self.models = Models(self.config, self.metrics, handles, deployment_names)
        self.admissions = Admissions(self.config, self.limiter, self.metrics)
        self.responses = self.limiter.responses  # stored responses, in the database
        owner = replica_owner()
        self.runs = BackgroundRuns(
            self.models,
            self.admissions,
            self.responses,
            owner[0] if owner else f"process-{os.getpid()}",
        )
        self.runs.sweep()  # take over the background responses of replicas that died

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(
            self.config,
            self.metrics,
            auth=self.auth,
            served=self.models,
            admissions=self.admissions,
            stored=self.responses,
            runs=self.runs,
        )

    async def __del__(self) -> None:
        """Graceful shutdown: deliver queued settlements, then have the limiter write usage."""
        try:
            await self.limiter.drain()
            await self.limiter.call("flush")
        except Exception as exc:  # shutting down: report, never raise
            logger.warning("limiter flush at shutdown failed: %r", exc)


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
