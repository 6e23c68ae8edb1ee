"""`POST /embeddings`: resolve the caller and model, call the EmbeddingServer, return JSON.

Concurrent requests for one model share handle calls (:mod:`voltage_ray.ingress.coalesce`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request, Response

from voltage_ray.config import ModelConfig
from voltage_ray.ingress import failover, guards
from voltage_ray.ingress.deps import get_meter, get_models, get_principal
from voltage_ray.ingress.meter import Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.protocol.embeddings import EmbeddingRequest, EmbeddingResponse

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Embeddings"])


@router.post(
    "/embeddings",
    summary="Create embeddings",
    response_model=EmbeddingResponse,
    response_class=Response,
)
async def create_embedding(
    body: EmbeddingRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
    models: Models = Depends(get_models),
    meter: Meter = Depends(get_meter),
) -> Response:
    model = models.resolve(body.model, "embeddings").config  # 404 for an unknown model
    request.state.model = model.id
    limits = models.config.request_limits
    inputs = body.inputs
    guards.at_most(len(inputs), limits.embeddings_max_inputs, "The number of inputs")
    longest = max(len(text) for text in inputs)
    guards.at_most(longest, limits.embeddings_max_input_chars, "The longest input's length")
    endpoint = request.url.path
    tries = failover.Tries.at(endpoint)

    ticket = await meter.admit(
        principal, endpoint=endpoint, model=body.model, tokens=body.token_upper_bound
    )
    tenant = ticket.tenant()

    async def embed(target: ModelConfig) -> EmbeddingResponse:
        shared = models.embedder(target.id)
        return await shared.submit((body, tenant), len(inputs), principal.key_id)

    response: EmbeddingResponse = await guards.within(
        failover.call(models, model, tries, embed, key=principal.key_id, meter=meter),
        limits.embeddings_timeout_s,
        "Embedding",
    )
    await meter.record(ticket, tokens=response.usage.total_tokens)
    models.metrics.prompt_tokens.inc(
        response.usage.prompt_tokens,
        tags={"endpoint": endpoint, "model": model.id, "plan": principal.plan},
    )
    # pydantic writes the JSON itself: thousands of floats are much faster there than json.dumps.
    return Response(
        response.model_dump_json(),
        media_type="application/json",
        headers={**ticket.headers, **tries.headers()},
    )
