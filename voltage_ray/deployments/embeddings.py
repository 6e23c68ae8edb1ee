"""EmbeddingServer: one Serve deployment per embeddings model, with dynamic batching.

Every input of every request is one item of a single ``@serve.batch`` queue, so a request with many
inputs is spread over batches (and put back in order), and concurrent requests share batches.
Ray's batcher closes a batch after its wait even while the model is still busy with the previous
one; under load that leaves many small batches queued behind the model. So the batched method only
hands its batch to an :class:`EncodeLoop` and returns at once; the loop runs the encodes in order
in the replica's encoder process (off the event loop and its interpreter lock) and merges the
batches that waited meanwhile, up to ``max_batch_size`` inputs. At low load the latency is the batch
wait; under load batches fill up while the model works.

Fairness between API keys (``backends/fairness.py``): each request holds a :class:`Place` from
its arrival to its answer, and the loop forms each batch from the pending chunks in fair order
(the key with the fewest inputs in the batch so far, then the least served lately), not arrival
order, so a key sending single inputs is encoded in the next batch however many inputs another
key has queued. At most ``max_queued_requests`` requests wait unstarted: past that, a request
whose key is under its fair share displaces the newest waiting request of the key most over it
(a 503, ``Overloaded``), else it is refused.

Batch size and wait come from the model's :class:`EmbeddingSettings`; ``reconfigure(user_config)``
changes them (and ``truncate``, ``torch_threads``) on running replicas. ``batch_stats()`` reports
the realized encode batch sizes (also the ``voltage_batch_size`` metric and a periodic
log line); Serve's ``serve_actual_batch_size`` metric shows the batcher's own batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from ray import serve

from voltage_ray.backends.embeddings import EncoderProcess, fit_dimensions
from voltage_ray.backends.fairness import Place, Places, Served, Tenant, first
from voltage_ray.backends.sources import materialize
from voltage_ray.config import EmbeddingSettings, ModelConfig
from voltage_ray.deployments.logs import quiet_refusals
from voltage_ray.errors import InternalError, Overloaded, VoltageError
from voltage_ray.metrics import ReplicaMetrics
from voltage_ray.protocol.embeddings import EmbeddingRequest, EmbeddingResponse, build_response

# Serve routes its own logger to the replica log (with the replica id); a module logger would
# stay silent at INFO.
logger = logging.getLogger("ray.serve")

_DEFAULTS = EmbeddingSettings()
# Requests with more text than this are tokenized (counted) off the event loop; smaller ones
# take less time than the hop to a thread.
INLINE_TOKENIZE_CHARS = 20_000
STATS_WINDOW = 1000
SUMMARY_LOG_S = 30.0
PIPELINE_DEPTH = 2  # encodes in flight at most: see EncodeLoop
SHED = Overloaded(details={"reason": "shed"})  # a request that gave way to a fairer one
SIZE_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]


class BatchStats:
    """Realized encode batch sizes: cumulative histogram, a recent window and a periodic log."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.sizes: Counter[int] = Counter()
        self.recent: deque[int] = deque(maxlen=STATS_WINDOW)
        self._logged_at = time.monotonic()
        self._since_log: list[int] = []
        self.metrics = ReplicaMetrics(model_id, "embeddings")

    def record(self, size: int) -> None:
        self.sizes[size] += 1
        self.recent.append(size)
        self._since_log.append(size)
        self.metrics.batch(size)
        now = time.monotonic()
        if now - self._logged_at >= SUMMARY_LOG_S:
            n = len(self._since_log)
            logger.info(
                "%s: %d encode batches in %.0f s, mean size %.1f, max %d",
                self.model_id,
                n,
                now - self._logged_at,
                sum(self._since_log) / n,
                max(self._since_log),
            )
            self._logged_at, self._since_log = now, []

    def summary(self) -> dict[str, Any]:
        recent = list(self.recent)
        return {
            "batches": sum(self.sizes.values()),
            "inputs": sum(k * v for k, v in self.sizes.items()),
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "recent_mean": sum(recent) / len(recent) if recent else 0.0,
            "recent_max": max(recent, default=0),
        }


@dataclass(eq=False)
class Chunk:
    """Inputs of one request waiting for a batch, and the future of their embeddings."""

    texts: list[str]
    future: asyncio.Future[np.ndarray]
    place: Place
    seq: int
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tenant(self) -> Tenant:
        return self.place.tenant


class EncodeLoop:
    """Runs encodes in order; the chunks that wait meanwhile form the next batch, fairly.

    One batch is in flight, so that the next one fills while the model works; a second one is
    sent ahead only when a full batch waits, so that the model never idles between two batches
    while the results of one travel back (it would gain nothing to wait for more inputs then).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Awaitable[np.ndarray]],
        max_batch_size: int,
        on_batch: Callable[[int], None],
        on_wait: Callable[[float, str], None] | None = None,
        max_queued: int | None = None,
    ) -> None:
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.on_wait = on_wait  # hears how long each chunk waited for its encode, and its plan
        self._busy_s = 0.0
        self._pending: list[Chunk] = []
        self._queued = 0  # inputs in _pending
        self.places = Places(max_queued, max_batch_size)
        self._served = Served()
        self._seq = itertools.count()
        self._in_flight = 0
        self._busy_since = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def admit(self, tenant: Tenant) -> Place:
        """A place for a new request; :class:`Overloaded` when the queue is full and ``tenant``
        holds its share (a request of a key over its share may give way instead: its chunks
        fail with Overloaded)."""
        place, shed = self.places.admit(tenant)
        if shed is not None:
            for chunk in [c for c in self._pending if c.place is shed]:
                self._pending.remove(chunk)
                self._queued -= len(chunk.texts)
                chunk.future.set_exception(SHED)
        return place

    def leave(self, place: Place) -> None:
        """The request was answered (or failed): its place is free."""
        self.places.leave(place)
        self._served.forget(self.places.keys())

    def enqueue(self, texts: list[str], place: Place) -> asyncio.Future[np.ndarray]:
        """A future of the embeddings of ``texts`` (inputs of the request at ``place``), encoded
        with whatever else waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        if place.shed:
            future.set_exception(SHED)
            return future
        self._pending.append(Chunk(texts, future, place, next(self._seq)))
        self._queued += len(texts)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        self._wake.set()
        return future

    @property
    def busy_s(self) -> float:
        """Wall time with a batch in flight (the model working, or its result on the way)."""
        running = time.monotonic() - self._busy_since if self._in_flight else 0.0
        return self._busy_s + running

    def _take(self) -> list[Chunk]:
        """The next batch: chunks in fair order while they fit (the first always goes)."""
        group: list[Chunk] = []
        held: Counter[str] = Counter()  # inputs in this batch, per key
        size = 0
        while (chunk := first(self._pending, held, self._served)) is not None:
            if group and size + len(chunk.texts) > self.max_batch_size:
                break
            self._pending.remove(chunk)
            group.append(chunk)
            chunk.place.started = True
            size += len(chunk.texts)
            held[chunk.tenant.key] += len(chunk.texts)
            self._served.charge(chunk.tenant.key, len(chunk.texts))
        self._queued -= size
        return group

    def _may_start(self) -> bool:
        if not self._pending:
            return False
        if self._in_flight == 0:
            return True
        return self._in_flight < PIPELINE_DEPTH and self._queued >= self.max_batch_size

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._may_start():
                group = self._take()
                if self._in_flight == 0:
                    self._busy_since = time.monotonic()
                self._in_flight += 1
                task = loop.create_task(self._encode_group(group))
                self._batches.add(task)  # a strong reference until it is done
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._in_flight -= 1
        if self._in_flight == 0:
            self._busy_s += time.monotonic() - self._busy_since
        self._wake.set()

    async def _encode_group(self, group: list[Chunk]) -> None:
        texts = [t for chunk in group for t in chunk.texts]
        self.on_batch(len(texts))
        if self.on_wait is not None:
            now = time.monotonic()
            for chunk in group:
                self.on_wait(now - chunk.enqueued, chunk.tenant.plan)
        try:
            vectors = await self.encode(texts)
        except Exception as exc:
            for chunk in group:
                chunk.future.set_exception(exc)
            return
        start = 0
        for chunk in group:
            chunk.future.set_result(vectors[start : start + len(chunk.texts)])
            start += len(chunk.texts)


class EmbeddingServer:
    """Serves one embeddings model. Undecorated: the builder binds it with its deployment
    options; ``embed`` and ``batch_stats`` are also called directly through its handle."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        quiet_refusals()
        self.config = ModelConfig.model_validate(model)
        assert self.config.embeddings is not None
        self.base_settings = self.config.embeddings
        self.settings = self.base_settings
        location = materialize(self.config.source, Path(cache_dir))
        self.encoder = EncoderProcess(location, self.settings)
        self.limits = self.encoder.limits
        self.stats = BatchStats(self.config.id)
        self.shared_calls = self.shared_requests = 0  # embed_many calls, and their requests
        self.loop = EncodeLoop(
            self._encode,
            self.settings.max_batch_size,
            self.stats.record,
            on_wait=self.stats.metrics.waited,
            max_queued=self.config.replica_queue,
        )
        self._apply(self.settings)
        logger.info(
            "embeddings model %s ready (width %d, %d tokens per input, %d torch threads)",
            self.config.id,
            self.limits.dimensions,
            self.limits.max_input_tokens,
            self.settings.torch_threads or self.encoder.threads,
        )

    async def _encode(self, texts: list[str]) -> np.ndarray:
        return await asyncio.wrap_future(self.encoder.submit(texts))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config hook: overrides of the model's ``embeddings`` settings, applied
        to this running replica (a bad key fails the deploy, as everywhere in the config).

        Async, so that Serve runs it on the replica's event loop, between batches."""
        try:
            settings = EmbeddingSettings.model_validate(
                {**self.base_settings.model_dump(), **(user_config or {})}
            )
        except ValidationError as exc:
            raise ValueError(f"invalid user_config for {self.config.id!r}: {exc}") from None
        self._apply(settings)
        logger.info("embeddings model %s reconfigured: %s", self.config.id, settings)

    def _apply(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self._batcher.set_max_batch_size(settings.max_batch_size)
        self._batcher.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.loop.max_batch_size = settings.max_batch_size
        self.limits.truncate = settings.truncate
        if settings.torch_threads:  # None keeps the current count
            self.encoder.set_threads(settings.torch_threads)

    @property
    def _batcher(self) -> Any:
        """The ``@serve.batch`` wrapper, which carries its settings' getters and setters."""
        return self._embed_batch

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy while its encoder process is alive."""
        if self.encoder.broken:
            raise RuntimeError("the encoder process died")

    def __del__(self) -> None:
        """Serve's shutdown hook (also garbage collection): stop the encoder process."""
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            encoder.shutdown()

    async def info(self) -> dict[str, Any]:
        return {
            "id": self.config.id,
            "dimensions": self.limits.dimensions,
            "max_input_tokens": self.limits.max_input_tokens,
        }

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,  # replaced from config in _apply
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
    )
    async def _embed_batch(
        self, inputs: list[tuple[str, Place]]
    ) -> list[tuple[asyncio.Future[np.ndarray], int]]:
        """Per input (its text and its request's place): the future of its request's chunk and
        its row there. Returns at once, so the batcher goes on collecting the next batch while
        the loop encodes; the loop forms batches from the requests' chunks fairly."""
        groups: dict[Place, list[str]] = {}
        index: list[tuple[Place, int]] = []  # per input: its request and its row in its chunk
        for text, place in inputs:
            group = groups.setdefault(place, [])
            index.append((place, len(group)))
            group.append(text)
        futures = {place: self.loop.enqueue(group, place) for place, group in groups.items()}
        return [(futures[place], row) for place, row in index]

    async def embed(
        self,
        request: EmbeddingRequest | dict[str, Any],
        tenant: Tenant | dict[str, Any] | None = None,
    ) -> EmbeddingResponse:
        """Embeddings of one request's inputs, in order; BadRequest for what the model refuses,
        Overloaded (503) when the queue holds no place for ``tenant`` (the API key's, for fair
        batching; handle callers may leave it out)."""
        req = EmbeddingRequest.model_validate(request)
        texts = self.limits.texts(req.inputs)
        if sum(len(t) for t in texts) > INLINE_TOKENIZE_CHARS:
            prompt_tokens = await asyncio.to_thread(self.limits.prepare, texts, req.dimensions)
        else:
            prompt_tokens = self.limits.prepare(texts, req.dimensions)
        place = self._admit(Tenant.of(tenant))
        try:
            rows = await self._encode_all(texts, place)
        finally:
            self.loop.leave(place)
        vectors = fit_dimensions(np.stack(rows), req.dimensions)
        return build_response(
            vectors,
            model=self.config.id,
            prompt_tokens=prompt_tokens,
            encoding_format=req.encoding_format,
        )

    def _admit(self, tenant: Tenant) -> Place:
        try:
            return self.loop.admit(tenant)
        except Overloaded as exc:
            raise self._overloaded(exc) from None

    def _overloaded(self, exc: Overloaded) -> Overloaded:
        """The loop's refusal, naming this model."""
        queued = self.config.deployment.max_queued_requests
        return Overloaded.at(self.config.id, queued, str(exc.details.get("reason")))

    async def _encode_all(self, texts: list[str], place: Place) -> list[np.ndarray]:
        """The embedding of each text, in order, through the batcher."""
        places = await asyncio.gather(*(self._embed_batch((text, place)) for text in texts))
        # NOTE: wait, not gather: a batch's future is shared with other requests, and a
        # cancelled gather would cancel it for them too.
        await asyncio.wait({future for future, _ in places})
        if place.shed:
            raise self._overloaded(SHED)
        return [future.result()[row] for future, row in places]

    async def embed_many(
        self, requests: list[tuple[EmbeddingRequest | dict[str, Any], Tenant | None]]
    ) -> list[EmbeddingResponse | VoltageError]:
        """:meth:`embed` for the (request, tenant) pairs of one shared ingress call (see
        ``ingress.coalesce``): per request its response or its error, so that one bad request
        fails alone."""
        self.shared_calls += 1
        self.shared_requests += len(requests)
        results = await asyncio.gather(
            *(self.embed(r, t) for r, t in requests), return_exceptions=True
        )
        out: list[EmbeddingResponse | VoltageError] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, VoltageError):
                if not isinstance(result, Exception):  # cancellation: the whole call goes
                    raise result
                logger.error("embedding request failed", exc_info=result)
                result = InternalError()
            out.append(result)
        return out

    async def batch_stats(self) -> dict[str, Any]:
        """Realized encode batch sizes and the batching settings in force on this replica."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # called outside Serve
            replica = ""
        return {
            **self.stats.summary(),
            "encode_s": round(self.loop.busy_s, 3),
            "shared_calls": self.shared_calls,
            "shared_requests": self.shared_requests,
            "shed": self.loop.places.shed,
            "refused": self.loop.places.refused,
            "max_batch_size": self._batcher._get_max_batch_size(),
            "batch_wait_timeout_s": self._batcher._get_batch_wait_timeout_s(),
            "truncate": self.settings.truncate,
            "torch_threads": self.settings.torch_threads or self.encoder.threads,
            "replica": replica,
            "pid": os.getpid(),
        }
