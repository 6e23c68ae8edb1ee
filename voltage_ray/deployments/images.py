"""ImageServer: one Serve deployment per images model, batching compatible requests.

Requests enter through one ``@serve.batch`` queue. Ray closes a batch after its wait even while
the pipeline is still busy with the previous one, so the batched method only hands its jobs to a
:class:`GroupLoop` and returns at once. The loop runs one pipeline call at a time in a worker
thread (off the event loop); each call takes the oldest waiting job and every later job of the
same bucket (size, steps, guidance) that fits in ``max_pixels_per_call``, whichever batch it came
in. Other buckets wait their turn in arrival order, so none starves. At low load a call holds what
arrived in one batch wait; under load, what arrived during the previous call.

Fairness between API keys (``backends/fairness.py``): the call's first job is the one of the
highest priority, then of the key served the fewest images lately, then the oldest, and
compatible jobs join in that order; at most ``max_queued_requests`` jobs wait unstarted, and a
newcomer whose key is under its fair share displaces the newest waiting job of the key most over
it (a 503, ``Overloaded``), else it is refused.

A caller that goes away (client disconnect) is dropped: before its call starts it is skipped;
during its call its images leave the batch at the next denoising step (with a DDIM or Euler
scheduler; with others the call runs on for the rest), and a call whose callers all left stops
there. ``stats()`` reports batches, calls, cancellations and the call in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from voltage_ray.backends.fairness import Place, Places, Served, Tenant, rank
from voltage_ray.backends.images import (
    Bucket,
    ImageEngine,
    Job,
    OutputFormat,
    image_seeds,
    take_group,
)
from voltage_ray.backends.sources import materialize
from voltage_ray.config import ImageSettings, ModelConfig
from voltage_ray.deployments.logs import quiet_refusals
from voltage_ray.errors import Overloaded
from voltage_ray.metrics import ReplicaMetrics
from voltage_ray.protocol.images import ImageGenerationRequest

logger = logging.getLogger(__name__)

_DEFAULTS = ImageSettings()
LOAD_TIME_SETTINGS = ("dtype", "scheduler")
RECENT_CALLS = 200

Outcome = list[bytes] | None  # a job's images; None once its caller went away
SHED = Overloaded(details={"reason": "shed"})  # a job that gave way to a fairer one


def describe(jobs: Sequence[Job]) -> dict[str, Any]:
    """A pipeline call's bucket and load, as stats report it."""
    b = jobs[0].bucket
    return {
        "size": f"{b.width}x{b.height}",
        "steps": b.steps,
        "guidance": b.guidance,
        "requests": len(jobs),
        "images": sum(job.n for job in jobs),
    }


class ImageStats:
    """Counters and the most recent pipeline calls of one replica."""

    def __init__(self) -> None:
        self.requests = 0
        self.batches = 0
        self.calls = 0
        self.images = 0
        self.cancelled = 0
        self.interrupted_calls = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_CALLS)

    def record_call(self, jobs: Sequence[Job], outcomes: Sequence[Outcome], seconds: float) -> None:
        generated = sum(len(o) for o in outcomes if o is not None)
        self.calls += 1
        self.images += generated
        if all(o is None for o in outcomes):
            self.interrupted_calls += 1
        self.recent.append({**describe(jobs), "generated": generated, "seconds": round(seconds, 4)})

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "calls": self.calls,
            "images": self.images,
            "cancelled": self.cancelled,
            "interrupted_calls": self.interrupted_calls,
            "recent_calls": list(self.recent),
        }


class GroupLoop:
    """One pipeline call at a time in one worker thread, over the next group of waiting jobs."""

    def __init__(
        self,
        run: Callable[[Sequence[Job]], list[Outcome]],
        max_pixels: int,
        stats: ImageStats,
        metrics: ReplicaMetrics | None = None,
        max_queued: int | None = None,
        max_batch_size: int = 1,
    ) -> None:
        self.run = run
        self.max_pixels = max_pixels
        self.stats = stats
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.places = Places(max_queued, max_batch_size)
        self._place_of: dict[Job, Place] = {}
        self._served = Served()  # images per key lately
        self._pending: list[tuple[Job, asyncio.Future[Outcome]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.running: dict[str, Any] | None = None  # the call in progress, described

    @property
    def waiting(self) -> int:
        """Jobs waiting for a call whose callers are still there."""
        return sum(1 for job, _ in self._pending if not job.cancel.is_set())

    def admit(self, job: Job, tenant: Tenant) -> None:
        """A place for ``job``; :class:`Overloaded` when the queue is full and ``tenant`` holds
        its share (a waiting job of a key over its share may give way instead: it fails with
        Overloaded)."""
        place, shed = self.places.admit(tenant)
        self._place_of[job] = place
        if shed is not None:
            for item in [i for i in self._pending if self._place_of.get(i[0]) is shed]:
                self._pending.remove(item)
                item[1].set_exception(SHED)

    def leave(self, job: Job) -> None:
        """The job was answered (or failed): its place is free."""
        place = self._place_of.pop(job, None)
        if place is not None:
            self.places.leave(place)
        self._served.forget(self.places.keys())

    def enqueue(self, job: Job) -> asyncio.Future[Outcome]:
        """A future of ``job``'s images, generated in a call with the jobs it is compatible with."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        place = self._place_of.get(job)
        if place is not None and place.shed:
            future.set_exception(SHED)
            return future
        self._pending.append((job, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        self._wake.set()
        return future

    def _take(self) -> list[tuple[Job, asyncio.Future[Outcome]]]:
        """The next call's jobs: the fairest job first (``backends/fairness.py``), then jobs of
        its bucket in that order while their pixels fit."""
        for job, future in self._pending:
            if job.cancel.is_set() and not future.done():
                future.set_result(None)
        fair = sorted((job for job, _ in self._pending), key=self._rank)
        group = {id(job) for job in take_group(fair, self.max_pixels)}
        taken = [item for item in self._pending if id(item[0]) in group]
        self._pending = [
            item for item in self._pending if id(item[0]) not in group and not item[1].done()
        ]
        for job, _ in taken:
            place = self._place_of.get(job)
            if place is not None:
                place.started = True
                self._served.charge(place.tenant.key, job.n)
        return taken

    def _rank(self, job: Job) -> tuple[int, int, float, int]:
        place = self._place_of.get(job)
        if place is None:  # a job enqueued without a place (direct callers of the loop)
            return rank(Tenant(), 0, 0.0, 0)
        return rank(place.tenant, 0, self._served.of(place.tenant.key), place.seq)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while group := self._take():
                jobs = [job for job, _ in group]
                start = time.perf_counter()
                if self.metrics is not None:
                    now = time.monotonic()
                    for job in jobs:
                        place = self._place_of.get(job)
                        self.metrics.waited(now - job.created, place.tenant.plan if place else "")
                    self.metrics.batch(sum(job.n for job in jobs))
                self.running = describe(jobs)
                try:
                    outcomes = await loop.run_in_executor(self.executor, self.run, jobs)
                except Exception as exc:
                    logger.exception("pipeline call for %d requests failed", len(jobs))
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.running = None
                self.stats.record_call(jobs, outcomes, time.perf_counter() - start)
                for (_, future), outcome in zip(group, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)


class ImageServer:
    """Serves one images model. Undecorated: the builder binds it with its deployment options;
    ``generate`` and ``stats`` are also called directly through its handle."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        quiet_refusals()
        self.config = ModelConfig.model_validate(model)
        assert self.config.images is not None
        self.base_settings = self.config.images
        self.settings = self.base_settings
        location = materialize(self.config.source, Path(cache_dir))
        self.engine = ImageEngine(location, self.settings)
        self.counters = ImageStats()
        self.loop = GroupLoop(
            self.engine.run,
            self.settings.max_pixels_per_call,
            self.counters,
            ReplicaMetrics(self.config.id, "images"),
            max_queued=self.config.replica_queue,
            max_batch_size=self.settings.max_batch_size,
        )
        self._apply(self.settings)
        logger.info("images model %s ready: %s", self.config.id, self.engine.info())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config hook: overrides of the model's ``images`` settings, applied to
        this running replica (dtype and scheduler are fixed when the pipeline loads)."""
        settings = ImageSettings.model_validate(
            {**self.base_settings.model_dump(), **(user_config or {})}
        )
        for fixed in LOAD_TIME_SETTINGS:
            if getattr(settings, fixed) != getattr(self.settings, fixed):
                raise ValueError(f"images.{fixed} cannot change on a running replica; redeploy")
        self._apply(settings)
        logger.info("images model %s reconfigured: %s", self.config.id, settings)

    def _apply(self, settings: ImageSettings) -> None:
        self.settings = settings
        self._batcher.set_max_batch_size(settings.max_batch_size)
        self._batcher.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.loop.max_pixels = settings.max_pixels_per_call
        if settings.torch_threads:
            # torch's thread count is per thread: set it in the thread that generates.
            self.loop.executor.submit(self.engine.set_threads, settings.torch_threads)

    @property
    def _batcher(self) -> Any:
        """The ``@serve.batch`` wrapper, which carries its settings' getters and setters."""
        return self._submit

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy while its worker thread is alive."""
        if self.loop.executor._shutdown:
            raise RuntimeError("generation executor is shut down")

    async def info(self) -> dict[str, Any]:
        return {"id": self.config.id, **self.engine.info()}

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,  # replaced from config in _apply
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
    )
    async def _submit(self, jobs: list[Job]) -> list[asyncio.Future[Outcome]]:
        """Per job, the future of its images. Returns at once, so the batcher goes on collecting
        the next batch while the loop generates; the loop merges compatible jobs across batches."""
        self.counters.batches += 1
        return [self.loop.enqueue(job) for job in jobs]

    async def generate(
        self,
        request: ImageGenerationRequest | dict[str, Any],
        output_format: OutputFormat = "png",
        tenant: Tenant | dict[str, Any] | None = None,
    ) -> list[bytes]:
        """The request's ``n`` images, encoded as PNG (or JPEG), exactly the requested size;
        Overloaded (503) when the queue holds no place for ``tenant`` (the API key's, for fair
        batching; handle callers may leave it out)."""
        req = ImageGenerationRequest.model_validate(request)
        bucket = Bucket(req.width, req.height, req.num_inference_steps, req.guidance_scale)
        job = Job(req.prompt, bucket, image_seeds(req.seed, req.n), output_format)
        self.counters.requests += 1
        queued = self.config.deployment.max_queued_requests
        try:
            self.loop.admit(job, Tenant.of(tenant))
            future = await self._submit(job)
            images = await future
        except Overloaded as exc:
            reason = str(exc.details.get("reason"))
            raise Overloaded.at(self.config.id, queued, reason) from None
        except asyncio.CancelledError:  # the caller went away: drop the job wherever it is
            job.cancel.set()
            self.counters.cancelled += 1
            raise
        finally:
            self.loop.leave(job)
        if images is None:  # only a job whose caller went away has no images
            raise RuntimeError("image job was cancelled while its caller still waited")
        return images

    async def stats(self) -> dict[str, Any]:
        """Batching and cancellation counters of this replica, with its settings in force."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # called outside Serve
            replica = ""
        return {
            **self.counters.summary(),
            "max_batch_size": self._batcher._get_max_batch_size(),
            "batch_wait_timeout_s": self._batcher._get_batch_wait_timeout_s(),
            "running": self.loop.running,
            "waiting": self.loop.waiting,
            "shed": self.loop.places.shed,
            "refused": self.loop.places.refused,
            "max_pixels_per_call": self.loop.max_pixels,
            "replica": replica,
            "pid": os.getpid(),
        }
