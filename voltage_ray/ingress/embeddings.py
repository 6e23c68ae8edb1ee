"""`POST /embeddings`: resolve the caller and model, call the EmbeddingServer, return JSON.

Concurrent requests for one model share handle calls (:mod:`voltage_ray.ingress.coalesce`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request, Response

from voltage_ray.config import ModelConfig
from voltage_ray.ingress import failover, guards
from voltage_ray.ingress.deps import get_ingress, get_principal
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
) -> Response:
    ingress = get_ingress(request)
    ingress.resolve(body.model, "embeddings")  # 404 for an unknown model
    model = ingress.by_name[body.model]
    request.state.model = model.id
    limits = ingress.config.request_limits
    inputs = body.inputs
    guards.at_most(len(inputs), limits.embeddings_max_inputs, "The number of inputs")
    longest = max(len(text) for text in inputs)
    guards.at_most(longest, limits.embeddings_max_input_chars, "The longest input's length")
    endpoint = request.url.path
    tries = failover.Tries.at(endpoint)

    async with ingress.metered(
        principal, endpoint=endpoint, model=body.model, tokens=body.token_upper_bound
    ) as ticket:
        tenant = ticket.tenant()

        async def embed(target: ModelConfig) -> EmbeddingResponse:
            shared = ingress.embedder(target.id)
            return await shared.submit((body, tenant), len(inputs), principal.key_id)

        response: EmbeddingResponse = await guards.within(
            failover.call(ingress, model, tries, embed, key=principal.key_id),
            limits.embeddings_timeout_s,
            "Embedding",
        )
        await ingress.settle(ticket, tokens=response.usage.total_tokens)
    ingress.metrics.prompt_tokens.inc(
        response.usage.prompt_tokens,
        tags={"endpoint": endpoint, "model": model.id, "plan": principal.plan},
    )
    # pydantic writes the JSON itself: thousands of floats are much faster there than json.dumps.
    return Response(
        response.model_dump_json(),
        media_type="application/json",
        headers={**ticket.headers, **tries.headers()},
    )
