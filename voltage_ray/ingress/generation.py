"""Text generation through a ChatServer, shared by `POST /chat/completions` and
`POST /completions`: tokenize for admission, reserve, generate (JSON or SSE), settle, count.

The two routes differ only in their request model and the ChatServer methods they call
(:class:`Calls`); keys, limits, metering, failover, deadlines and metrics are the same.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from voltage_ray.config import ModelConfig
from voltage_ray.ingress import failover, guards, observe, sse
from voltage_ray.ingress.deps import get_ingress
from voltage_ray.ingress.errors import request_id
from voltage_ray.protocol.common import Usage

if TYPE_CHECKING:
    from voltage_ray.ingress.services import Services
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
    body: Any, request: Request, principal: Principal, model: ModelConfig, calls: Calls
) -> Any:
    """Serve one generation request whose cost limits were checked: ``body`` is the endpoint's
    request model (with ``stream`` and ``include_usage``)."""
    ingress = get_ingress(request)
    request.state.model = model.id
    limits = ingress.config.request_limits
    endpoint = request.url.path
    tries = failover.Tries.at(endpoint)

    def method(target: ModelConfig, name: str, stream: bool = False) -> Any:
        handle = ingress.handles[target.id]
        return getattr(handle.options(stream=True) if stream else handle, name)

    async def prepare(target: ModelConfig) -> dict[str, int]:
        return await failover.result(method(target, calls.prepare).remote(body))

    key = principal.key_id

    # Prompt tokens, max_tokens and choices, or a 400.
    budget = await guards.within(
        failover.call(ingress, model, tries, prepare, "prepare", key),
        limits.chat_timeout_s,
        calls.title,
    )
    reserve = budget["prompt_tokens"] + budget["max_tokens"] * budget["n"]
    tags = {"model": model.id, "plan": principal.plan}
    service_tier = getattr(body, "service_tier", None)
    if not body.stream:
        async with ingress.metered(
            principal, endpoint=endpoint, model=body.model, tokens=reserve
        ) as ticket:
            tenant = ticket.tenant(service_tier)

            async def whole(target: ModelConfig) -> Any:
                return await failover.result(method(target, calls.whole).remote(body, tenant))

            response = await guards.within(
                failover.call(ingress, model, tries, whole, key=key),
                limits.chat_timeout_s,
                calls.title,
            )
            await ingress.settle(ticket, tokens=response.usage.total_tokens)
        count_tokens(ingress, endpoint, tags, response.usage)
        headers = {**ticket.headers, **tries.headers()}
        return JSONResponse(response.model_dump(mode="json"), headers=headers)

    ticket = await ingress.admit(principal, endpoint=endpoint, model=body.model, tokens=reserve)
    tenant = ticket.tenant(service_tier)
    usage: dict[str, Usage | None] = {"so_far": None}

    async def open_stream(target: ModelConfig) -> tuple[Any, Any]:
        gen = method(target, calls.stream, stream=True).remote(body, tenant)
        return await sse.first_item(gen), gen

    try:
        first, gen = await guards.within(
            failover.call(ingress, model, tries, open_stream, key=key),
            limits.chat_timeout_s,
            calls.title,
        )
    except BaseException:
        await asyncio.shield(ingress.settle(ticket))
        raise
    ingress.metrics.ttft.observe(observe.since_arrival(request.state), tags={"model": model.id})
    include_usage = body.include_usage

    def render(chunk: Any) -> str | None:
        # Chunks carry the usage so far: it settles a stream the client abandoned.
        if chunk.usage is not None:
            usage["so_far"] = chunk.usage
        if not chunk.choices:  # the final usage chunk
            return str(chunk.model_dump_json()) if include_usage else None
        if include_usage:  # OpenAI: usage is null on every chunk but the last
            return str(chunk.model_copy(update={"usage": None}).model_dump_json())
        return str(chunk.model_dump_json(exclude={"usage"}))

    async def close(failure: BaseException | None) -> None:
        used = usage["so_far"]
        await ingress.settle(ticket, tokens=used.total_tokens if used else 0)
        if used is not None:
            count_tokens(ingress, endpoint, tags, used)

    opened = time.monotonic()
    frames = sse.relay(
        first,
        gen,
        render,
        endpoint=endpoint,
        rid=request_id(request),
        on_close=close,
        timeout_s=limits.chat_timeout_s,
        explain=lambda exc: failover.lost_mid_stream(exc, tries, opened),
    )
    headers = {**sse.HEADERS, **ticket.headers, **tries.headers()}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)


def count_tokens(ingress: Services, endpoint: str, tags: dict[str, str], usage: Usage) -> None:
    ingress.metrics.prompt_tokens.inc(usage.prompt_tokens, tags={**tags, "endpoint": endpoint})
    if usage.completion_tokens:
        ingress.metrics.completion_tokens.inc(usage.completion_tokens, tags=tags)
