"""ChatServer: one Serve deployment per chat model, usable over HTTP or directly via its handle.

``chat`` returns a whole :class:`ChatCompletionResponse`; ``chat_stream`` yields
:class:`ChatCompletionChunk`s and always ends with a usage chunk (``choices == []``), which the
ingress forwards only when the client asked for it. Generation runs in one worker thread per
replica; cancelling the caller (client disconnect) stops the generation at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voltage_ray.backends.chat import ChatEngine, Prepared, StepEvent
from voltage_ray.backends.sources import materialize
from voltage_ray.config import ModelConfig
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

_DONE = object()


@dataclass(frozen=True)
class Finished:
    """The last item of a generation: tokens used by each choice."""

    tokens: list[int]


class ChatServer:
    """Serves one chat model. Undecorated: the builder binds it with its deployment options."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        self.config = ModelConfig.model_validate(model)
        assert self.config.chat is not None
        location = materialize(self.config.source, Path(cache_dir))
        self.engine = ChatEngine(location, self.config.chat)
        # One generate at a time per replica: concurrent torch generates only thrash the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._stats = {"generations": 0, "cancelled": 0, "active": 0}
        logger.info("chat model %s ready (context %d)", self.config.id, self.engine.context_length)

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy while its worker thread is alive."""
        if self._executor._shutdown:
            raise RuntimeError("generation executor is shut down")

    async def info(self) -> dict[str, Any]:
        """The model's id, context length, where its weights live and generation counters."""
        return {
            "id": self.config.id,
            "context_length": self.engine.context_length,
            "device": str(self.engine.model.device),
            "dtype": str(self.engine.model.dtype).removeprefix("torch."),
            **self._stats,
        }

    async def prepare(self, request: ChatCompletionRequest | dict[str, Any]) -> dict[str, int]:
        """Prompt tokens and resolved max_tokens of a request (for admission), or a BadRequest."""
        p = self.engine.prepare(ChatCompletionRequest.model_validate(request))
        return {"prompt_tokens": p.prompt_tokens, "max_tokens": p.max_tokens, "n": p.n}

    async def _events(self, prepared: Prepared) -> AsyncIterator[list[StepEvent] | Finished]:
        """Bridge the generate thread to asyncio; yields step events, then the token counts."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(events: list[StepEvent]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, events)

        def run() -> None:
            try:
                used = self.engine.generate(prepared, emit, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, (_DONE, used))
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(queue.put_nowait, (_DONE, exc))

        future = loop.run_in_executor(self._executor, run)
        self._stats["generations"] += 1
        self._stats["active"] += 1
        completed = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, tuple) and item[0] is _DONE:
                    completed = True
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    yield Finished(item[1])
                    return
                yield item
        finally:
            self._stats["active"] -= 1
            cancel.set()  # a no-op when finished; stops generation when the caller went away
            if not completed:
                self._stats["cancelled"] += 1
                future.add_done_callback(lambda f: f.exception())

    async def chat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        req = ChatCompletionRequest.model_validate(request)
        prepared = self.engine.prepare(req)
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
        prepared = self.engine.prepare(req)  # a BadRequest here precedes the first chunk
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
                    done = ChunkChoice(
                        index=ev.index, delta=Delta(), finish_reason=ev.finish_reason
                    )  # type: ignore[arg-type]
                    yield chunk([done])
