"""Text generation through a ChatServer, shared by `POST /chat/completions` and
`POST /completions`: tokenize for admission, reserve, generate (JSON or SSE), settle, count.

The two routes differ only in their request model and the ChatServer methods they call
(:class:`Calls`); keys, limits, metering, failover, deadlines and metrics are the same.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from voltage_ray.config import ModelConfig
from voltage_ray.errors import VoltageError
from voltage_ray.ingress import failover, guards, observe, sse
from voltage_ray.ingress.errors import request_id
from voltage_ray.protocol.common import Usage

if TYPE_CHECKING:
    from voltage_ray.ingress.meter import Meter, Ticket
    from voltage_ray.ingress.served_models import Models
    from voltage_ray.limits.limiter import Principal


@dataclass(frozen=True)
class Calls:
    """The ChatServer methods of one endpoint: token budget, whole answer, stream."""

    prepare: str
    whole: str
    stream: str
    title: str  # for deadline errors: "<title> timed out"


CHAT = Calls("prepare", "chat", "chat_stream", "Chat completion")
COMPLETIONS = Calls("prepare_completion", "complete", "complete_stream", "Completion")


async def generate(
    body: Any,
    request: Request,
    principal: Principal,
    model: ModelConfig,
    calls: Calls,
    models: Models,
    meter: Meter,
) -> Any:
    """Serve one generation request whose cost limits were checked: ``body`` is the endpoint's
    request model (with ``stream`` and ``include_usage``)."""
    request.state.model = model.id
    limits = models.config.request_limits
    endpoint = request.url.path
    tries = failover.Tries.at(endpoint)
    key = principal.key_id
    reserve, prepared = await reservation(models, meter, body, model, calls, tries, key)
    tags = {"model": model.id, "plan": principal.plan}
    service_tier = getattr(body, "service_tier", None)
    if not body.stream:
        ticket = await meter.admit(principal, endpoint=endpoint, model=body.model, tokens=reserve)
        tenant = ticket.tenant(service_tier)

        async def whole(target: ModelConfig) -> Any:
            made = prepared if target.id == model.id else None  # a fallback prepares anew
            return await failover.result(
                method(models, target, calls.whole).remote(body, tenant, made)
            )

        response = await guards.within(
            failover.call(models, model, tries, whole, key=key, meter=meter),
            limits.chat_timeout_s,
            calls.title,
        )
        await meter.record(ticket, tokens=response.usage.total_tokens)
        count_tokens(models, endpoint, tags, response.usage)
        headers = {**ticket.headers, **tries.headers()}
        return JSONResponse(response.model_dump(mode="json"), headers=headers)

    stream = await open_stream(
        models, meter, body, principal, model, calls, tries, reserve, prepared
    )
    models.metrics.ttft.observe(observe.since_arrival(request.state), tags={"model": model.id})
    include_usage = body.include_usage

    def render(chunk: Any) -> str | None:
        stream.note(chunk)  # the usage so far settles a stream the client abandoned
        if not chunk.choices:  # the final usage chunk
            return str(chunk.model_dump_json()) if include_usage else None
        if include_usage:  # OpenAI: usage is null on every chunk but the last
            return str(chunk.model_copy(update={"usage": None}).model_dump_json())
        return str(chunk.model_dump_json(exclude={"usage"}))

    frames = sse.relay(
        stream.first,
        stream.gen,
        render,
        endpoint=endpoint,
        rid=request_id(request),
        on_close=stream.close,
        timeout_s=limits.chat_timeout_s,
        explain=stream.explain,
    )
    headers = {**sse.HEADERS, **stream.ticket.headers, **tries.headers()}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)


def method(models: Models, target: ModelConfig, name: str, stream: bool = False) -> Any:
    """A ChatServer method of ``target``'s deployment (a streaming call where ``stream``)."""
    handle = models.handles[target.id]
    return getattr(handle.options(stream=True) if stream else handle, name)


async def reservation(
    models: Models,
    meter: Meter,
    body: Any,
    model: ModelConfig,
    calls: Calls,
    tries: failover.Tries,
    key: str,
) -> tuple[int, Any]:
    """The tokens a request may at most use (prompt, plus max_tokens per choice), from the
    model's tokenizer, and what the replica prepared (template, tokens, grammar), which the
    generation call then takes instead of preparing again; a 400 for a request the model
    cannot serve (past its context...)."""

    async def prepare(target: ModelConfig) -> dict[str, Any]:
        return await failover.result(method(models, target, calls.prepare).remote(body))

    budget = await guards.within(
        failover.call(models, model, tries, prepare, "prepare", key, meter),
        models.config.request_limits.chat_timeout_s,
        calls.title,
    )
    reserve = int(budget["prompt_tokens"] + budget["max_tokens"] * budget["n"])
    # Prepared by a fallback (the model's replicas gone): the generation call prepares anew.
    made_by_model = tries.attempts and not tries.attempts[-1].step.startswith("fallback")
    return reserve, budget.get("prepared") if made_by_model else None


@dataclass
class Stream:
    """An admitted generation whose first chunk arrived: the chunks come from ``first`` then
    ``gen``, each item a chunk or a list of chunks (the model's ``chat.stream_interval_ms``).
    :meth:`note` each chunk (the usage so far), and :meth:`close` once: it records
    what was used (a stream the client abandoned: the usage so far) and counts the tokens."""

    models: Models
    meter: Meter
    first: Any
    gen: Any
    ticket: Ticket
    tries: failover.Tries
    tags: dict[str, str]
    opened: float = field(default_factory=time.monotonic)
    usage: Usage | None = None

    def note(self, chunk: Any) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage

    async def close(self, failure: BaseException | None = None) -> None:
        used = self.usage
        await self.meter.record(self.ticket, tokens=used.total_tokens if used else 0)
        if used is not None:
            count_tokens(self.models, self.ticket.endpoint, self.tags, used)

    def explain(self, exc: BaseException) -> VoltageError | None:
        """A replica lost mid-stream: a 503 saying the request may be retried."""
        return failover.lost_mid_stream(exc, self.tries, self.opened)


async def open_stream(
    models: Models,
    meter: Meter,
    body: Any,
    principal: Principal,
    model: ModelConfig,
    calls: Calls,
    tries: failover.Tries,
    reserve: int,
    prepared: Any = None,
) -> Stream:
    """Admit ``body`` (reserving ``reserve`` tokens) and open its stream on ``model`` (or a
    fallback), within the chat deadline; the admission is recorded unused if that fails.
    ``prepared``: what ``model``'s replica made of ``body`` (a fallback prepares anew)."""
    endpoint = tries.url
    ticket = await meter.admit(principal, endpoint=endpoint, model=body.model, tokens=reserve)
    tenant = ticket.tenant(getattr(body, "service_tier", None))

    async def start(target: ModelConfig) -> tuple[Any, Any]:
        made = prepared if target.id == model.id else None
        chat = target.chat
        batch_ms = chat.stream_interval_ms if chat is not None else None
        gen = method(models, target, calls.stream, stream=True).remote(
            body, tenant, made, batch_ms or None
        )
        return await sse.first_item(gen), gen

    try:
        first, gen = await guards.within(
            failover.call(models, model, tries, start, key=principal.key_id, meter=meter),
            models.config.request_limits.chat_timeout_s,
            calls.title,
        )
    except BaseException:
        await asyncio.shield(meter.record(ticket))
        raise
    tags = {"model": model.id, "plan": principal.plan}
    return Stream(models, meter, first, gen, ticket, tries, tags)


def count_tokens(models: Models, endpoint: str, tags: dict[str, str], usage: Usage) -> None:
    models.metrics.prompt_tokens.inc(usage.prompt_tokens, tags={**tags, "endpoint": endpoint})
    if usage.completion_tokens:
        models.metrics.completion_tokens.inc(usage.completion_tokens, tags=tags)
