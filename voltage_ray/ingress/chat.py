"""`POST /chat/completions`: check the request's cost, then generate (``generation.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from voltage_ray.config import ModelConfig, RequestLimits
from voltage_ray.ingress import guards
from voltage_ray.ingress.deps import get_meter, get_models, get_principal
from voltage_ray.ingress.generation import CHAT, generate
from voltage_ray.ingress.meter import Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.protocol.chat import ChatCompletionRequest

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Chat"])


@router.post("/chat/completions", summary="Create chat completion", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
    models: Models = Depends(get_models),
    meter: Meter = Depends(get_meter),
) -> Any:
    model = models.resolve(body.model, "chat").config  # 404 for an unknown model
    check_cost(body, model, models.config.request_limits)
    return await generate(body, request, principal, model, CHAT, models, meter)


def check_cost(body: ChatCompletionRequest, model: ModelConfig, limits: RequestLimits) -> None:
    """Refuse, before any model work, a request over the configured cost limits."""
    guards.at_most(len(body.messages), limits.chat_max_messages, "The number of messages")
    chars = sum(len(m.text) for m in body.messages)
    guards.at_most(chars, limits.chat_max_prompt_chars, "The prompt length in characters")
    assert model.chat is not None
    max_tokens = body.requested_max_tokens or model.chat.default_max_tokens
    guards.at_most(body.n * max_tokens, limits.chat_max_total_tokens, "n x max_tokens")
