"""EmbeddingServer: one Serve deployment per embeddings model, with dynamic batching.

Every input of every request is one item of a single ``@serve.batch`` queue, so a request with many
inputs is spread over batches (and put back in order), and concurrent requests share batches.
Ray's batcher closes a batch after its wait even while the model is still busy with the previous
one; under load that leaves many small batches queued behind the model. So the batched method only
hands its batch to an :class:`EncodeLoop` and returns at once; the loop runs the encodes in order
in the replica's encoder process (off the event loop and its interpreter lock) and merges the
batches that waited meanwhile, up to ``max_batch_size`` inputs. At low load the latency is the batch
wait; under load batches fill up while the model works.

Batch size and wait come from the model's :class:`EmbeddingSettings`; ``reconfigure(user_config)``
changes them (and ``truncate``, ``torch_threads``) on running replicas. ``batch_stats()`` reports
the realized encode batch sizes (also the ``voltage_batch_size`` metric and a periodic
log line); Serve's ``serve_actual_batch_size`` metric shows the batcher's own batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from ray import serve

from voltage_ray.backends.embeddings import EncoderProcess, fit_dimensions
from voltage_ray.backends.sources import materialize
from voltage_ray.config import EmbeddingSettings, ModelConfig
from voltage_ray.errors import InternalError, VoltageError
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
Chunk = tuple[list[str], "asyncio.Future[np.ndarray]", float]  # texts, their rows, enqueued at
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


class EncodeLoop:
    """Runs encodes in order; the chunks that wait meanwhile are merged into the next batch.

    One batch is in flight, so that the next one fills while the model works; a second one is
    sent ahead only when a full batch waits, so that the model never idles between two batches
    while the results of one travel back (it would gain nothing to wait for more inputs then).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Awaitable[np.ndarray]],
        max_batch_size: int,
        on_batch: Callable[[int], None],
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.on_wait = on_wait  # hears how long each chunk waited for its encode
        self._busy_s = 0.0
        self._pending: deque[Chunk] = deque()
        self._queued = 0  # inputs in _pending
        self._in_flight = 0
        self._busy_since = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def enqueue(self, texts: list[str]) -> asyncio.Future[np.ndarray]:
        """A future of the embeddings of ``texts``, encoded together with whatever else waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((texts, future, time.monotonic()))
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
        group: list[Chunk] = []
        size = 0
        while self._pending:
            texts, future, enqueued = self._pending[0]
            if group and size + len(texts) > self.max_batch_size:
                break
            self._pending.popleft()
            group.append((texts, future, enqueued))
            size += len(texts)
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
        texts = [t for chunk, _, _ in group for t in chunk]
        self.on_batch(len(texts))
        if self.on_wait is not None:
            now = time.monotonic()
            for _, _, enqueued in group:
                self.on_wait(now - enqueued)
        try:
            vectors = await self.encode(texts)
        except Exception as exc:
            for _, future, _ in group:
                future.set_exception(exc)
            return
        start = 0
        for chunk, future, _ in group:
            future.set_result(vectors[start : start + len(chunk)])
            start += len(chunk)


class EmbeddingServer:
    """Serves one embeddings model. Undecorated: the builder binds it with its deployment
    options; ``embed`` and ``batch_stats`` are also called directly through its handle."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
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
    async def _embed_batch(self, texts: list[str]) -> list[tuple[asyncio.Future[np.ndarray], int]]:
        """Per input: the future of its batch's embeddings and its row there. Returns at once,
        so the batcher goes on collecting the next batch while this one is encoded."""
        future = self.loop.enqueue(texts)
        return [(future, i) for i in range(len(texts))]

    async def embed(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        """Embeddings of one request's inputs, in order; BadRequest for what the model refuses."""
        req = EmbeddingRequest.model_validate(request)
        texts = self.limits.texts(req.inputs)
        if sum(len(t) for t in texts) > INLINE_TOKENIZE_CHARS:
            prompt_tokens = await asyncio.to_thread(self.limits.prepare, texts, req.dimensions)
        else:
            prompt_tokens = self.limits.prepare(texts, req.dimensions)
        places = await asyncio.gather(*(self._embed_batch(text) for text in texts))
        # NOTE: wait, not gather: a batch's future is shared with other requests, and a
        # cancelled gather would cancel it for them too.
        await asyncio.wait({future for future, _ in places})
        rows = [future.result()[row] for future, row in places]
        vectors = fit_dimensions(np.stack(rows), req.dimensions)
        return build_response(
            vectors,
            model=self.config.id,
            prompt_tokens=prompt_tokens,
            encoding_format=req.encoding_format,
        )

    async def embed_many(
        self, requests: list[EmbeddingRequest | dict[str, Any]]
    ) -> list[EmbeddingResponse | VoltageError]:
        """:meth:`embed` for the requests of one shared ingress call (see ``ingress.coalesce``):
        per request its response or its error, so that one bad request fails alone."""
        self.shared_calls += 1
        self.shared_requests += len(requests)
        results = await asyncio.gather(*(self.embed(r) for r in requests), return_exceptions=True)
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
            "max_batch_size": self._batcher._get_max_batch_size(),
            "batch_wait_timeout_s": self._batcher._get_batch_wait_timeout_s(),
            "truncate": self.settings.truncate,
            "torch_threads": self.settings.torch_threads or self.encoder.threads,
            "replica": replica,
            "pid": os.getpid(),
        }
