"""`POST /chat/completions`: resolve the caller and model, call the ChatServer, JSON or SSE."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from voltage_ray.config import ModelConfig, RequestLimits
from voltage_ray.errors import GatewayTimeout
from voltage_ray.ingress import guards, sse
from voltage_ray.ingress.deps import get_ingress, get_principal
from voltage_ray.ingress.errors import request_id
from voltage_ray.protocol.chat import ChatCompletionChunk, ChatCompletionRequest

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Chat"])


@router.post("/chat/completions", summary="Create chat completion", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
) -> Any:
    ingress = get_ingress(request)
    handle = ingress.resolve(body.model, "chat")
    limits = ingress.config.request_limits
    check_cost(body, ingress.by_name[body.model], limits)
    budget = await handle.prepare.remote(body)  # prompt tokens and max_tokens, or a 400
    reserve = budget["prompt_tokens"] + budget["max_tokens"] * budget["n"]
    endpoint = request.url.path
    if not body.stream:
        async with ingress.metered(
            principal, endpoint=endpoint, model=body.model, tokens=reserve
        ) as ticket:
            response = await guards.within(
                handle.chat.remote(body), limits.chat_timeout_s, "Chat completion"
            )
            await ingress.settle(ticket, tokens=response.usage.total_tokens)
        return JSONResponse(response.model_dump(mode="json"), headers=ticket.headers)

    ticket = await ingress.admit(principal, endpoint=endpoint, model=body.model, tokens=reserve)
    used = {"tokens": 0}
    try:
        gen = handle.options(stream=True).chat_stream.remote(body)
        first = await asyncio.wait_for(sse.first_item(gen), limits.chat_timeout_s)
    except asyncio.TimeoutError:
        await asyncio.shield(ingress.settle(ticket))
        raise GatewayTimeout(
            f"Chat completion exceeded its deadline of {limits.chat_timeout_s:g} s"
        ) from None
    except BaseException:
        await asyncio.shield(ingress.settle(ticket))
        raise
    include_usage = body.include_usage

    def render(chunk: ChatCompletionChunk) -> str | None:
        # Chunks carry the usage so far: it settles a stream the client abandoned.
        if chunk.usage is not None:
            used["tokens"] = chunk.usage.total_tokens
        if not chunk.choices:  # the final usage chunk
            return chunk.model_dump_json() if include_usage else None
        if include_usage:  # OpenAI: usage is null on every chunk but the last
            return chunk.model_copy(update={"usage": None}).model_dump_json()
        return chunk.model_dump_json(exclude={"usage"})

    async def close(failure: BaseException | None) -> None:
        await ingress.settle(ticket, tokens=used["tokens"])

    frames = sse.relay(
        first,
        gen,
        render,
        endpoint=endpoint,
        rid=request_id(request),
        on_close=close,
        timeout_s=limits.chat_timeout_s,
    )
    headers = {**sse.HEADERS, **ticket.headers}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)


def check_cost(body: ChatCompletionRequest, model: ModelConfig, limits: RequestLimits) -> None:
    """Refuse, before any model work, a request over the configured cost limits."""
    guards.at_most(len(body.messages), limits.chat_max_messages, "The number of messages")
    chars = sum(len(m.text) for m in body.messages)
    guards.at_most(chars, limits.chat_max_prompt_chars, "The prompt length in characters")
    assert model.chat is not None
    max_tokens = body.requested_max_tokens or model.chat.default_max_tokens
    guards.at_most(body.n * max_tokens, limits.chat_max_total_tokens, "n x max_tokens")
