"""ChatServer: one Serve deployment per chat model, usable over HTTP or directly via its handle.

``chat`` returns a whole :class:`ChatCompletionResponse`; ``chat_stream`` yields
:class:`ChatCompletionChunk`s and always ends with a usage chunk (``choices == []``), which the
ingress forwards only when the client asked for it. The engine (``chat.engine`` in the config:
transformers' continuous batching, or vLLM) batches all requests of a replica; cancelling the
caller (client disconnect, deadline) cancels its request in the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.util import metrics

from voltage_ray.backends.batching import Finished
from voltage_ray.backends.chat import Prepared, StepEvent
from voltage_ray.backends.engines import build_backend
from voltage_ray.backends.sources import materialize
from voltage_ray.config import ModelConfig
from voltage_ray.metrics import ReplicaMetrics
from voltage_ray.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    completion_id,
    now,
)
from voltage_ray.protocol.common import Usage

logger = logging.getLogger(__name__)

EXPORT_PERIOD_S = 1.0


class ChatServer:
    """Serves one chat model. Undecorated: the builder binds it with its deployment options."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        self.config = ModelConfig.model_validate(model)
        settings = self.config.chat
        assert settings is not None
        location = materialize(self.config.source, Path(cache_dir))
        self._exported_at = 0.0
        self.metrics = ReplicaMetrics(self.config.id, "chat")
        self._running = metrics.Gauge(
            "voltage_chat_running_rows", description="Rows decoding.", tag_keys=("model",)
        )
        self._waiting = metrics.Gauge(
            "voltage_chat_waiting_requests",
            description="Requests waiting for rows (or prefilling).",
            tag_keys=("model",),
        )
        self.backend = build_backend(
            location,
            settings,
            self.config.deployment.ray_actor_options.num_gpus,
            on_step=self._on_step,
            on_admit=self.metrics.waited,
        )
        self.prompter = self.backend.prompter
        self._stats = {"generations": 0, "cancelled": 0, "active": 0}
        logger.info(
            "chat model %s ready: engine %s, context %d, %d rows per batch",
            self.config.id,
            self.backend.name,
            self.prompter.context_length,
            settings.max_num_seqs,
        )

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy while its engine runs."""
        if not self.backend.alive:
            raise RuntimeError(f"the {self.backend.name} chat engine stopped")

    def __del__(self) -> None:
        """Serve's shutdown hook (also garbage collection): stop the engine."""
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()

    def _on_step(self, size: int) -> None:
        """On the scheduler thread after each decode step: the batch size, and the gauges at
        most every EXPORT_PERIOD_S (each request's end also sets them)."""
        self.metrics.batch(size)
        if time.monotonic() - self._exported_at >= EXPORT_PERIOD_S:
            self._export(self.backend.stats())

    def _export(self, state: dict[str, Any]) -> None:
        self._exported_at = time.monotonic()
        tags = {"model": self.config.id}
        self._running.set(state["running"], tags=tags)
        if "waiting" in state:
            self._waiting.set(state["waiting"], tags=tags)

    async def info(self) -> dict[str, Any]:
        """The model, its engine and where its weights live, request counters and the engine's
        state (transformers: ``running`` rows, ``waiting`` requests and the realized
        ``batch_sizes`` as size: steps)."""
        state = self.backend.stats()
        self._export(state)
        return {
            "id": self.config.id,
            "engine": self.backend.name,
            "context_length": self.prompter.context_length,
            **self.backend.placement(),
            **self._stats,
            **state,
        }

    async def prepare(self, request: ChatCompletionRequest | dict[str, Any]) -> dict[str, int]:
        """Prompt tokens and resolved max_tokens of a request (for admission), or a BadRequest."""
        p = self.prompter.prepare(ChatCompletionRequest.model_validate(request))
        return {"prompt_tokens": p.prompt_tokens, "max_tokens": p.max_tokens, "n": p.n}

    async def _events(self, prepared: Prepared) -> AsyncIterator[list[StepEvent] | Finished]:
        """The engine's events for one request, with the replica's counters."""
        events = self.backend.stream(prepared)
        self._stats["generations"] += 1
        self._stats["active"] += 1
        completed = False
        try:
            async for item in events:
                completed = isinstance(item, Finished)
                yield item
                if completed:
                    return
        finally:
            self._stats["active"] -= 1
            if not completed:
                self._stats["cancelled"] += 1
            await events.aclose()  # cancels the request in the engine when it did not finish
            self._export(self.backend.stats())

    async def chat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        req = ChatCompletionRequest.model_validate(request)
        prepared = self.prompter.prepare(req)
        texts = [""] * prepared.n
        reasons: list[str | None] = [None] * prepared.n
        completion = 0
        async for item in self._events(prepared):
            if isinstance(item, Finished):
                completion = sum(item.tokens)
                continue
            for ev in item:
                texts[ev.index] += ev.text
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        return ChatCompletionResponse(
            id=completion_id(),
            created=now(),
            model=self.config.id,
            choices=[
                Choice(index=i, message=ResponseMessage(content=t), finish_reason=r)  # type: ignore[arg-type]
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
            usage=Usage(
                prompt_tokens=prepared.prompt_tokens,
                completion_tokens=completion,
                total_tokens=prepared.prompt_tokens + completion,
            ),
        )

    async def chat_stream(
        self, request: ChatCompletionRequest | dict[str, Any]
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks of one completion. Every chunk carries the usage so far (callers that follow
        OpenAI's format strip it); the last chunk has no choices and the final usage."""
        req = ChatCompletionRequest.model_validate(request)
        prepared = self.prompter.prepare(req)  # a BadRequest here precedes the first chunk
        cid, created, model = completion_id(), now(), self.config.id
        row_tokens = [0] * prepared.n

        def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
            completion = sum(row_tokens)
            usage = Usage(
                prompt_tokens=prepared.prompt_tokens,
                completion_tokens=completion,
                total_tokens=prepared.prompt_tokens + completion,
            )
            return ChatCompletionChunk(
                id=cid, created=created, model=model, choices=choices, usage=usage
            )

        for i in range(prepared.n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for item in self._events(prepared):
            if isinstance(item, Finished):
                row_tokens = list(item.tokens)
                yield chunk([])
                return
            for ev in item:
                row_tokens[ev.index] = ev.tokens
                if ev.text:
                    yield chunk([ChunkChoice(index=ev.index, delta=Delta(content=ev.text))])
                if ev.finish_reason is not None:
                    reason: Any = ev.finish_reason  # "stop" or "length"
                    done = ChunkChoice(index=ev.index, delta=Delta(), finish_reason=reason)
                    yield chunk([done])
