"""`POST /chat/completions`: resolve the caller and model, call the ChatServer, JSON or SSE."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from voltage_ray.config import ModelConfig, RequestLimits
from voltage_ray.ingress import failover, guards, observe, sse
from voltage_ray.ingress.deps import get_ingress, get_principal
from voltage_ray.ingress.errors import request_id
from voltage_ray.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from voltage_ray.protocol.common import Usage

if TYPE_CHECKING:
    from voltage_ray.ingress.deployment import Ingress
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Chat"])


@router.post("/chat/completions", summary="Create chat completion", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
) -> Any:
    ingress = get_ingress(request)
    ingress.resolve(body.model, "chat")  # 404 for an unknown model
    model = ingress.by_name[body.model]
    request.state.model = model.id
    limits = ingress.config.request_limits
    check_cost(body, model, limits)
    endpoint = request.url.path
    tries = failover.Tries.at(endpoint)

    async def prepare(target: ModelConfig) -> dict[str, int]:
        return await failover.result(ingress.handles[target.id].prepare.remote(body))

    # Prompt tokens and max_tokens, or a 400.
    budget = await guards.within(
        failover.call(ingress, model, tries, prepare, "prepare"),
        limits.chat_timeout_s,
        "Chat completion",
    )
    reserve = budget["prompt_tokens"] + budget["max_tokens"] * budget["n"]
    tags = {"model": model.id, "plan": principal.plan}
    if not body.stream:

        async def generate(target: ModelConfig) -> ChatCompletionResponse:
            return await failover.result(ingress.handles[target.id].chat.remote(body))

        async with ingress.metered(
            principal, endpoint=endpoint, model=body.model, tokens=reserve
        ) as ticket:
            response = await guards.within(
                failover.call(ingress, model, tries, generate),
                limits.chat_timeout_s,
                "Chat completion",
            )
            await ingress.settle(ticket, tokens=response.usage.total_tokens)
        count_tokens(ingress, endpoint, tags, response.usage)
        headers = {**ticket.headers, **tries.headers()}
        return JSONResponse(response.model_dump(mode="json"), headers=headers)

    ticket = await ingress.admit(principal, endpoint=endpoint, model=body.model, tokens=reserve)
    usage: dict[str, Usage | None] = {"so_far": None}

    async def open_stream(target: ModelConfig) -> tuple[ChatCompletionChunk, Any]:
        gen = ingress.handles[target.id].options(stream=True).chat_stream.remote(body)
        return await sse.first_item(gen), gen

    try:
        first, gen = await guards.within(
            failover.call(ingress, model, tries, open_stream),
            limits.chat_timeout_s,
            "Chat completion",
        )
    except BaseException:
        await asyncio.shield(ingress.settle(ticket))
        raise
    ingress.metrics.ttft.observe(observe.since_arrival(request.state), tags={"model": model.id})
    include_usage = body.include_usage

    def render(chunk: ChatCompletionChunk) -> str | None:
        # Chunks carry the usage so far: it settles a stream the client abandoned.
        if chunk.usage is not None:
            usage["so_far"] = chunk.usage
        if not chunk.choices:  # the final usage chunk
            return chunk.model_dump_json() if include_usage else None
        if include_usage:  # OpenAI: usage is null on every chunk but the last
            return chunk.model_copy(update={"usage": None}).model_dump_json()
        return chunk.model_dump_json(exclude={"usage"})

    async def close(failure: BaseException | None) -> None:
        used = usage["so_far"]
        await ingress.settle(ticket, tokens=used.total_tokens if used else 0)
        if used is not None:
            count_tokens(ingress, endpoint, tags, used)

    frames = sse.relay(
        first,
        gen,
        render,
        endpoint=endpoint,
        rid=request_id(request),
        on_close=close,
        timeout_s=limits.chat_timeout_s,
    )
    headers = {**sse.HEADERS, **ticket.headers, **tries.headers()}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)


def count_tokens(ingress: Ingress, endpoint: str, tags: dict[str, str], usage: Usage) -> None:
    ingress.metrics.prompt_tokens.inc(usage.prompt_tokens, tags={**tags, "endpoint": endpoint})
    if usage.completion_tokens:
        ingress.metrics.completion_tokens.inc(usage.completion_tokens, tags=tags)


def check_cost(body: ChatCompletionRequest, model: ModelConfig, limits: RequestLimits) -> None:
    """Refuse, before any model work, a request over the configured cost limits."""
    guards.at_most(len(body.messages), limits.chat_max_messages, "The number of messages")
    chars = sum(len(m.text) for m in body.messages)
    guards.at_most(chars, limits.chat_max_prompt_chars, "The prompt length in characters")
    assert model.chat is not None
    max_tokens = body.requested_max_tokens or model.chat.default_max_tokens
    guards.at_most(body.n * max_tokens, limits.chat_max_total_tokens, "n x max_tokens")
