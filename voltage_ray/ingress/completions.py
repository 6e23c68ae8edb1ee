"""`POST /completions` (OpenAI's legacy text completions): check the request's cost, then
generate on the chat model's engine, raw prompts without its chat template
(``generation.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from voltage_ray.config import RequestLimits
from voltage_ray.ingress import guards
from voltage_ray.ingress.deps import get_meter, get_models, get_principal
from voltage_ray.ingress.generation import COMPLETIONS, generate
from voltage_ray.ingress.meter import Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.protocol.completions import CompletionRequest

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Completions"])


@router.post("/completions", summary="Create completion", response_model=None)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
    models: Models = Depends(get_models),
    meter: Meter = Depends(get_meter),
) -> Any:
    # 404 for an unknown model (completions: chat models)
    model = models.resolve(body.model, "chat").config
    check_cost(body, models.config.request_limits)
    return await generate(body, request, principal, model, COMPLETIONS, models, meter)


def check_cost(body: CompletionRequest, limits: RequestLimits) -> None:
    """The chat limits, applied to prompts: characters (text) or tokens (ids) in all, and
    choices x max_tokens."""
    size = sum(len(p) for p in body.prompts)
    guards.at_most(size, limits.chat_max_prompt_chars, "The prompt length in characters")
    choices = body.n * len(body.prompts)
    guards.at_most(choices * body.max_tokens, limits.chat_max_total_tokens, "n x max_tokens")
