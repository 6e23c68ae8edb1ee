"""ChatServer: one Serve deployment per chat model, usable over HTTP or directly via its handle.

``chat`` returns a whole :class:`ChatCompletionResponse`; ``chat_stream`` yields
:class:`ChatCompletionChunk`s and always ends with a usage chunk (``choices == []``), which the
ingress forwards only when the client asked for it. With ``batch_ms`` (the ingress passes the
model's ``chat.stream_interval_ms``) it yields lists of chunks instead, at most one list per
``batch_ms`` after the first (``deployments/stream_batches.py``). ``complete`` and
``complete_stream`` do the same for legacy text completions (:class:`CompletionResponse`: raw
prompts, no chat template). The engine (``chat.engine`` in the config: llama.cpp or
transformers continuous batching on CPU, vLLM on GPU) batches all requests of a replica;
cancelling the caller (client disconnect, deadline) cancels its request in the engine.

Every method takes the request's ``tenant`` (``backends/fairness.py``; the ingress passes the
API key's, handle callers may leave it out): the engine shares its rows and queue fairly between
keys, and a request that finds no place in the queue raises :class:`Overloaded` (a 503) before
its first item, so a stream sends nothing until its first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.util import metrics

from voltage_ray.backends.chat import Finished, Prepared, PromptScored, StepEvent
from voltage_ray.backends.factory import build_backend
from voltage_ray.backends.fairness import Tenant
from voltage_ray.config import ModelConfig
from voltage_ray.deployments.asks import prepare_chat, prepare_completion
from voltage_ray.deployments.chat_output import ChoiceOutput, tool_parser
from voltage_ray.deployments.completion_output import CompletionOutput, merge
from voltage_ray.deployments.logs import quiet_refusals
from voltage_ray.deployments.stream_batches import in_batches
from voltage_ray.errors import Overloaded
from voltage_ray.metrics import ReplicaMetrics
from voltage_ray.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    Delta,
    completion_id,
    now,
)
from voltage_ray.protocol.common import CompletionUsage
from voltage_ray.protocol.completions import CompletionChoice, CompletionRequest, CompletionResponse

logger = logging.getLogger(__name__)

EXPORT_PERIOD_S = 1.0
TenantArg = Tenant | dict[str, Any] | None


class ChatServer:
    """Serves one chat model. Undecorated: the builder binds it with its deployment options."""

    def __init__(self, model: ModelConfig | dict[str, Any], cache_dir: str) -> None:
        quiet_refusals()
        self.config = ModelConfig.model_validate(model)
        settings = self.config.chat
        assert settings is not None
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
        self._preemptions = metrics.Counter(
            "voltage_preemptions",
            description="Chat rows paused for a request of a key under its fair share (or of "
            "a higher priority), their KV cache set aside until they resume.",
            tag_keys=("model",),
        )
        self._preempted = 0  # preemptions exported so far
        self.backend = build_backend(
            self.config,
            Path(cache_dir),
            on_step=self._on_step,
            on_admit=lambda seconds, tenant: self.metrics.waited(seconds, tenant.plan),
        )
        self.prompter = self.backend.prompter
        # tokenized: requests prepared (template, tokens, grammar) here; each request once.
        self._stats = {"generations": 0, "cancelled": 0, "active": 0, "tokenized": 0}
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
        preempted = state.get("preemptions", 0)
        if preempted > self._preempted:
            self._preemptions.inc(preempted - self._preempted, tags=tags)
            self._preempted = preempted

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

    async def prepare(self, request: ChatCompletionRequest | dict[str, Any]) -> dict[str, Any]:
        """Prompt tokens and resolved max_tokens of a request (for admission), or a BadRequest
        (a schema that cannot be enforced among them: compiled here, once, and cached), and
        ``prepared``: what :meth:`chat` and :meth:`chat_stream` then generate from, so that a
        request is tokenized once and generates from exactly what was admitted."""
        _, p = await self._prepare(request)
        return {
            "prompt_tokens": p.prompt_tokens,
            "max_tokens": p.max_tokens,
            "n": p.n,
            "prepared": p,
        }

    async def _prepare(
        self, request: ChatCompletionRequest | dict[str, Any], prepared: Prepared | None = None
    ) -> tuple[ChatCompletionRequest, Prepared]:
        """Validate and tokenize in a worker thread: a long prompt or a cold grammar compile
        never blocks this replica's event loop (llguidance and tokenizers drop the GIL).
        ``prepared``: what :meth:`prepare` made of this request (the body, already validated
        by the ingress, is then only read)."""
        req = ChatCompletionRequest.model_validate(request)
        if prepared is not None:
            return req, prepared
        self._stats["tokenized"] += 1
        return req, await asyncio.to_thread(prepare_chat, self.prompter, req)

    def _outputs(self, req: ChatCompletionRequest, prepared: Prepared) -> list[ChoiceOutput]:
        assert self.config.chat is not None
        parser, scored = self.config.chat.tool_parser, prepared.logprobs is not None
        return [
            ChoiceOutput(i, tool_parser(req, parser), self.prompter.token_bytes, scored)
            for i in range(prepared.n)
        ]

    async def _events(
        self, prepared: Prepared, tenant: TenantArg
    ) -> AsyncIterator[list[StepEvent] | PromptScored | Finished]:
        """The engine's events for one request, with the replica's counters; Overloaded (503,
        naming this model) when its queue holds no place for the request."""
        events = self.backend.stream(prepared, Tenant.of(tenant))
        self._stats["generations"] += 1
        self._stats["active"] += 1
        completed = False
        try:
            async for item in events:
                completed = isinstance(item, Finished)
                yield item
                if completed:
                    return
        except Overloaded as exc:
            queued = self.config.deployment.max_queued_requests
            reason = str(exc.details.get("reason", "refused"))
            raise Overloaded.at(self.config.id, queued, reason) from None
        finally:
            self._stats["active"] -= 1
            if not completed:
                self._stats["cancelled"] += 1
            await events.aclose()  # cancels the request in the engine when it did not finish
            self._export(self.backend.stats())

    async def chat(
        self,
        request: ChatCompletionRequest | dict[str, Any],
        tenant: TenantArg = None,
        prepared: Prepared | None = None,
    ) -> ChatCompletionResponse:
        req, prepared = await self._prepare(request, prepared)
        outputs = self._outputs(req, prepared)
        completion = cached = 0
        async for item in self._events(prepared, tenant):
            if isinstance(item, Finished):
                completion, cached = sum(item.tokens), item.cached_tokens
                continue
            assert not isinstance(item, PromptScored)  # chat asks for no prompt logprobs
            for ev in item:
                outputs[ev.index].add(ev)
        return ChatCompletionResponse(
            id=completion_id(),
            created=now(),
            model=self.config.id,
            choices=[out.choice() for out in outputs],
            usage=CompletionUsage.of(prepared.prompt_tokens, completion, cached),
        )

    async def chat_stream(
        self,
        request: ChatCompletionRequest | dict[str, Any],
        tenant: TenantArg = None,
        prepared: Prepared | None = None,
        batch_ms: float | None = None,
    ) -> AsyncIterator[ChatCompletionChunk | list[ChatCompletionChunk]]:
        """Chunks of one completion, from the first token on (the role chunks come with it).
        Every chunk carries the usage so far (callers that follow OpenAI's format strip it); the
        last chunk has no choices and the final usage. ``batch_ms``: lists of chunks, at most
        one list per ``batch_ms`` after the first."""
        async for item in _batched(self._chat_chunks(request, tenant, prepared), batch_ms):
            yield item

    async def _chat_chunks(
        self,
        request: ChatCompletionRequest | dict[str, Any],
        tenant: TenantArg,
        prepared: Prepared | None,
    ) -> AsyncIterator[ChatCompletionChunk]:
        # a BadRequest here precedes the first chunk
        req, prepared = await self._prepare(request, prepared)
        outputs = self._outputs(req, prepared)
        cid, created, model = completion_id(), now(), self.config.id
        row_tokens = [0] * prepared.n
        cached = 0  # known at the end (the final usage chunk)

        def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
            usage = CompletionUsage.of(prepared.prompt_tokens, sum(row_tokens), cached)
            return ChatCompletionChunk(
                id=cid, created=created, model=model, choices=choices, usage=usage
            )

        started = False
        async for item in self._events(prepared, tenant):
            if not started:  # a request refused or shed has sent nothing: a 503, not a stream
                started = True
                for i in range(prepared.n):
                    yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            if isinstance(item, Finished):
                row_tokens, cached = list(item.tokens), item.cached_tokens
                yield chunk([])
                return
            assert not isinstance(item, PromptScored)  # chat asks for no prompt logprobs
            for ev in item:
                row_tokens[ev.index] = ev.tokens
                for choice in outputs[ev.index].deltas(ev):
                    yield chunk([choice])

    # --- legacy text completions ---------------------------------------------------------------

    async def prepare_completion(
        self, request: CompletionRequest | dict[str, Any]
    ) -> dict[str, Any]:
        """As :meth:`prepare`, for a completions request: its prompts' tokens, the max_tokens
        of each choice, the number of choices (``n`` per prompt), and ``prepared``."""
        _, prepared = await self._prepare_completion(request)
        return {
            "prompt_tokens": sum(p.prompt_tokens for p in prepared),
            "max_tokens": prepared[0].max_tokens,
            "n": sum(p.n for p in prepared),
            "prepared": prepared,
        }

    async def _prepare_completion(
        self, request: CompletionRequest | dict[str, Any], given: list[Prepared] | None = None
    ) -> tuple[CompletionRequest, list[Prepared]]:
        req = CompletionRequest.model_validate(request)
        if given is not None:
            return req, given
        self._stats["tokenized"] += 1

        def prepare() -> list[Prepared]:
            return [prepare_completion(self.prompter, prompt, req) for prompt in req.prompts]

        return req, await asyncio.to_thread(prepare)

    async def complete(
        self,
        request: CompletionRequest | dict[str, Any],
        tenant: TenantArg = None,
        prepared: list[Prepared] | None = None,
    ) -> CompletionResponse:
        req, prepared = await self._prepare_completion(request, prepared)
        outputs = self._completion_outputs(req, prepared)
        used, cached = [0] * len(prepared), [0] * len(prepared)
        async for _ in self._completion_pieces(req, prepared, outputs, used, cached, tenant):
            pass
        completion = sum(used)
        prompt = sum(p.prompt_tokens for p in prepared)
        return CompletionResponse(
            id=completion_id("cmpl"),
            created=now(),
            model=self.config.id,
            choices=[out.choice() for out in outputs],
            usage=CompletionUsage.of(prompt, completion, sum(cached)),
        )

    async def complete_stream(
        self,
        request: CompletionRequest | dict[str, Any],
        tenant: TenantArg = None,
        prepared: list[Prepared] | None = None,
        batch_ms: float | None = None,
    ) -> AsyncIterator[CompletionResponse | list[CompletionResponse]]:
        """Chunks of a completions request, each with the usage so far; the last has no
        choices and the final usage (``batch_ms``: in lists, as :meth:`chat_stream`)."""
        async for item in _batched(self._completion_chunks(request, tenant, prepared), batch_ms):
            yield item

    async def _completion_chunks(
        self,
        request: CompletionRequest | dict[str, Any],
        tenant: TenantArg,
        prepared: list[Prepared] | None,
    ) -> AsyncIterator[CompletionResponse]:
        req, prepared = await self._prepare_completion(request, prepared)
        outputs = self._completion_outputs(req, prepared)
        cid, created, model = completion_id("cmpl"), now(), self.config.id
        prompt = sum(p.prompt_tokens for p in prepared)
        used, cached = [0] * len(prepared), [0] * len(prepared)

        def chunk(choices: list[CompletionChoice]) -> CompletionResponse:
            usage = CompletionUsage.of(prompt, sum(used), sum(cached))
            return CompletionResponse(
                id=cid, created=created, model=model, choices=choices, usage=usage
            )

        async for piece in self._completion_pieces(req, prepared, outputs, used, cached, tenant):
            yield chunk([piece])
        yield chunk([])

    def _completion_outputs(
        self, req: CompletionRequest, prepared: list[Prepared]
    ) -> list[CompletionOutput]:
        def token_text(token: int) -> str:
            return self.prompter.token_bytes(token).decode("utf-8", errors="replace")

        scoring = req.logprobs is not None
        return [
            CompletionOutput(i * req.n + j, token_text, scoring)
            for i in range(len(prepared))
            for j in range(req.n)
        ]

    async def _completion_pieces(
        self,
        req: CompletionRequest,
        prepared: list[Prepared],
        outputs: list[CompletionOutput],
        used: list[int],
        cached: list[int],
        tenant: TenantArg,
    ) -> AsyncIterator[CompletionChoice]:
        """Every prompt generates at once; the choices' pieces as they come (echoed prompts
        with the first item: nothing before the engine took the request). Choice ``j`` of
        prompt ``i`` is ``outputs[i * n + j]``; ``used[i]``: prompt ``i``'s tokens so far,
        ``cached[i]``: its prompt tokens the prefix cache held (known when it finishes)."""
        n = req.n
        tokens = [[0] * n for _ in prepared]
        echo_waits_for_scores = req.echo and req.logprobs is not None
        echo_first = req.echo and not echo_waits_for_scores
        async for i, item in merge([self._events(p, tenant) for p in prepared]):
            if echo_first:
                echo_first = False
                for k, prompt in enumerate(req.prompts):
                    for j in range(n):
                        yield outputs[k * n + j].echo(self._prompt_text(prompt), None)
            if isinstance(item, PromptScored):
                if echo_waits_for_scores:
                    for j in range(n):
                        yield outputs[i * n + j].echo(self._prompt_text(req.prompts[i]), item)
                continue
            if isinstance(item, Finished):
                used[i], cached[i] = sum(item.tokens), item.cached_tokens
                for j in range(n):
                    out = outputs[i * n + j]
                    if out.finish_reason is None:  # max_tokens 0: the prompt scored, no tokens
                        yield out.add(StepEvent(j, "", "length"))
                continue
            for ev in item:
                tokens[i][ev.index] = ev.tokens
                used[i] = sum(tokens[i])
                yield outputs[i * n + ev.index].add(ev)

    def _prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.prompter.decode(prompt)


async def _batched(chunks: AsyncIterator[Any], batch_ms: float | None) -> AsyncIterator[Any]:
    """``chunks`` one by one, or in lists (``batch_ms``); closing this closes ``chunks``."""
    if not batch_ms:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return
    async for batch in in_batches(chunks, batch_ms / 1000):
        yield batch
