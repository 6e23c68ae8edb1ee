"""The chat engine interface the ChatServer deployment uses, and its transformers implementation.

An engine turns a :class:`Prepared` prompt into a stream of step events (``list[StepEvent]``)
ending with :class:`Finished` (tokens per choice); leaving the stream early (the caller went
away, a deadline passed) cancels the generation. Three engines implement it: ``transformers``
(voltage_ray's continuous-batching scheduler over a transformers model, CPU and GPU),
``llama_cpp`` (the same scheduler over llama.cpp, GGUF on CPU; ``backends/llama_cpp_engine.py``)
and ``vllm`` (vLLM's ``AsyncLLM``: its CUDA build on GPU, its CPU build in an environment of its
own; ``backends/vllm_engine.py``). All build prompts with the same :class:`Prompter`, so token
counts, the context check, usage and finish reasons agree whichever engine runs;
``backends/factory.py`` picks one per model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from voltage_ray.backends.batching import BatchScheduler
from voltage_ray.backends.chat import (
    ChatEngine,
    Finished,
    Prepared,
    Prompter,
    PromptScored,
    StepEvent,
)
from voltage_ray.backends.fairness import ANONYMOUS, Tenant
from voltage_ray.backends.scheduler import Scheduler
from voltage_ray.config import ChatSettings

Events = AsyncGenerator[list[StepEvent] | PromptScored | Finished, None]


class ChatBackend(Protocol):
    """What a chat engine offers the ChatServer."""

    name: str
    prompter: Prompter

    def stream(self, prepared: Prepared, tenant: Tenant = ANONYMOUS) -> Events:
        """Step events of one request, then Finished; closing it early cancels the request.
        ``tenant``: whose it is, for fair scheduling between keys (``backends/fairness.py``);
        :class:`~voltage_ray.errors.Overloaded` when the model's queue holds no place for it."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine state for ``info()``: at least ``running`` rows and ``waiting`` requests."""
        ...

    def placement(self) -> dict[str, str]:
        """Where the weights live: ``device`` and ``dtype``."""
        ...

    @property
    def alive(self) -> bool: ...

    def shutdown(self) -> None: ...


class SchedulerBackend:
    """An engine whose forward passes a voltage_ray :class:`Scheduler` drives (transformers,
    llama.cpp): requests go to its thread, events come back on the caller's event loop."""

    name = ""
    prompter: Prompter
    scheduler: Scheduler

    async def stream(self, prepared: Prepared, tenant: Tenant = ANONYMOUS) -> Events:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ticket = self.scheduler.submit(
            prepared, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), tenant
        )
        completed = False
        try:
            while not completed:
                item = await queue.get()
                if isinstance(item, BaseException):
                    completed = True
                    raise item
                completed = isinstance(item, Finished)
                yield item
        finally:
            if not completed:  # the caller went away: free its rows before the next step
                self.scheduler.cancel(ticket)

    def stats(self) -> dict[str, Any]:
        return self.scheduler.stats()

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def shutdown(self) -> None:
        self.scheduler.shutdown()


class TransformersBackend(SchedulerBackend):
    """voltage_ray's continuous-batching scheduler over a transformers model."""

    name = "transformers"

    def __init__(
        self,
        location: str,
        settings: ChatSettings,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, Tenant], None] | None = None,
        max_queued: int | None = None,
    ) -> None:
        self.engine = ChatEngine(location, settings)
        self.prompter = self.engine
        self.scheduler = BatchScheduler(
            self.engine.model,
            self.engine.decode,
            self.engine.eos_ids,
            max_num_seqs=settings.max_num_seqs,
            max_prefill_tokens=settings.max_prefill_tokens,
            on_step=on_step,
            on_admit=on_admit,
            grammars=self.engine.grammars,
            max_queued=max_queued,
            headroom_rows=settings.headroom_rows,
        )

    def placement(self) -> dict[str, str]:
        model = self.engine.model
        return {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
