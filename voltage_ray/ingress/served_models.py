"""The models this ingress replica serves, as the routes see them: resolve a name to its
config and handle, whether each is ready (Serve's view, kept fresh by a background task),
whether a request may take a place among what a model holds at once (its capacity), and the
shared calls to an embeddings model (``coalesce.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any, NamedTuple

from ray import serve

from voltage_ray.backends.fairness import let_in
from voltage_ray.config import AppConfig, EmbeddingSettings, ModelConfig, ModelKind
from voltage_ray.errors import NotFound, shown
from voltage_ray.ingress.coalesce import Coalescer
from voltage_ray.ingress.meter import Meter
from voltage_ray.metrics import IngressMetrics

logger = logging.getLogger(__name__)

READY_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})
STATUS_REFRESH_S = 1.0  # how often a background task refreshes the view of Serve's state
STATUS_STALE_S = 5.0  # an older view is refreshed before it is used
ROUTABLE_POLL_S = 0.25  # how often a try waiting for a replica asks Serve again
INPUTS_PER_SHARED_CALL = 256  # embeddings inputs one shared call carries at most


class Served(NamedTuple):
    """A model resolved by name: its config and the handle of its deployment."""

    config: ModelConfig
    handle: Any  # DeploymentHandle


class Models:
    """The served models (see the module's docstring). ``config`` and ``metrics`` are the
    app's: what a model call's deadline and counters come from."""

    def __init__(
        self,
        config: AppConfig,
        metrics: IngressMetrics,
        handles: dict[str, Any],
        deployment_names: dict[str, str],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.handles = handles  # model id -> DeploymentHandle
        self.deployment_names = deployment_names  # model id -> Serve deployment name
        self.by_name: dict[str, ModelConfig] = {
            name: m for m in config.models for name in m.names
        }  # every id and alias
        self.by_id: dict[str, ModelConfig] = {m.id: m for m in config.models}
        self._status_cache: tuple[float, dict[str, tuple[bool, int]]] | None = None
        self._status_refresh: asyncio.Task[dict[str, tuple[bool, int]]] | None = None
        self._status_watch: asyncio.Task[None] | None = None
        self._status_forgotten = 0.0  # when forget_readiness() last ran
        self._coalescers: dict[str, Coalescer] = {}
        self._occupied: dict[str, collections.Counter[str]] = {
            m.id: collections.Counter() for m in config.models
        }  # model id -> requests let in, per API key

    def resolve(self, name: str, kind: ModelKind) -> Served:
        """The ``kind`` model called ``name`` (id or alias): its config and handle, else 404."""
        model = self.by_name.get(name)
        if model is None or model.kind != kind:
            available = sorted(n for m in self.config.models if m.kind == kind for n in m.names)
            what = "does not exist" if model is None else f"is not one of the {kind} models"
            raise NotFound(
                f"The model '{shown(name)}' {what}. Available {kind} models: "
                + ", ".join(available),
                details={"available_models": available},
            )
        return Served(model, self.handles[model.id])

    def embedder(self, name: str) -> Coalescer:
        """The shared calls to the embeddings model called ``name`` (id or alias), else 404."""
        model, handle = self.resolve(name, "embeddings")
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

    async def occupy(self, model: ModelConfig, key: str, meter: Meter | None) -> bool:
        """Take the request's place among those ``model`` may hold at once at this replica:
        what its running replicas take (max_ongoing_requests each) plus its queue
        (max_queued_requests). When they are full, only a key holding less than its fair share
        of them (the places over the keys holding some) is let in: the replicas' own fair
        queues then decide whose request gives way (``backends/fairness.py``). False: the
        model is at capacity for ``key``. Held until the response ends, across all of the
        request's calls (chat: tokenize, then generate), so a request let in is not refused
        half way (the place is ``meter``'s: none for a meter apart from a request).
        Embeddings calls carry many requests: the replica's queue alone bounds them."""
        queued = model.deployment.max_queued_requests
        if meter is None or not meter.in_request or model.id in meter.places:
            return True
        if model.kind == "embeddings":
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

        meter.places[model.id] = release
        return True

    def default(self, kind: ModelKind) -> ModelConfig | None:
        """The first ``kind`` model configured (what a request naming none gets)."""
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
        """Keep the view fresh, from the loop requests run on (started with the first call;
        started again if that task ended or runs on another loop)."""
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
