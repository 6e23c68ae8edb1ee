"""What the routes need from the ingress replica, as one interface: the layer between them.

Imports run one way: ``api`` (the FastAPI app) -> the routes (``chat``, ``completions``,
``embeddings``, ``images``, ``models``) -> ``failover``, ``guards``, ``sse`` -> this module ->
``limits``, ``config``. The :class:`Ingress` deployment (``deployment.py``) implements
:class:`Services` and builds the app; nothing below it imports it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from voltage_ray.backends.fairness import Tenant
from voltage_ray.config import AppConfig, ModelConfig, ModelKind
from voltage_ray.limits.limiter import Grant, Principal
from voltage_ray.metrics import IngressMetrics


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
    used: tuple[int, int] = (0, 0)  # tokens, images: recorded by Services.settle
    in_request: bool = True  # delivered by SettleBeforeLastByte (else at once by settle)
    idempotent: bool = False  # admitted with the request's Idempotency-Key

    def tenant(self, service_tier: str | None = None) -> Tenant:
        """Whose request this is, for the model replicas' fair scheduling: the API key and its
        plan's priority; OpenAI's ``service_tier: flex`` asks for less (one level lower), and no
        tier raises a key above its plan."""
        priority = self.grant.priority if self.grant is not None else 0
        if service_tier == "flex":
            priority -= 1
        return Tenant(self.principal.key_id, priority, self.principal.plan)


class Runs(Protocol):
    """The background responses a replica runs (``response_runs.BackgroundRuns``)."""

    owner: str  # the name its leases carry

    def launch(self, coro: Any) -> None: ...

    def sweep(self) -> None: ...


class Services(Protocol):
    """The ingress replica as the routes and failover see it."""

    config: AppConfig
    metrics: IngressMetrics
    handles: dict[str, Any]  # model id -> DeploymentHandle
    deployment_names: dict[str, str]  # model id -> Serve deployment name
    by_name: dict[str, ModelConfig]  # every id and alias
    by_id: dict[str, ModelConfig]
    responses: Any  # the stored responses (``limits.client.ResponsesClient``)
    runs: Runs

    # --- callers and their limits ---
    async def authenticate(self, request: Request) -> Principal: ...

    async def admit(
        self, principal: Principal, *, endpoint: str, model: str, tokens: int = 0, images: int = 0
    ) -> Ticket: ...

    async def settle(self, ticket: Ticket, *, tokens: int = 0, images: int = 0) -> None: ...

    def metered(
        self, principal: Principal, *, endpoint: str, model: str, tokens: int = 0, images: int = 0
    ) -> AbstractAsyncContextManager[Ticket]: ...

    # --- models ---
    def resolve(self, name: str, kind: ModelKind) -> Any: ...

    def default_model(self, kind: ModelKind) -> ModelConfig | None: ...

    def embedder(self, name: str) -> Any: ...

    async def readiness(self) -> dict[str, bool]: ...

    async def routable(self, model: ModelConfig) -> bool: ...

    def forget_readiness(self) -> None: ...

    async def occupy(self, model: ModelConfig, key: str) -> bool: ...

    def observe_failover(self, model_id: str, error: str) -> None: ...

    def observe_overload(self, model_id: str, reason: str) -> None: ...
