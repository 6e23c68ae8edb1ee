"""`GET /models` (ids and aliases, in OpenAI's shape) and `GET /health`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from voltage_ray.errors import NotFound, ServiceUnavailable, shown
from voltage_ray.ingress.deps import get_models, get_principal
from voltage_ray.ingress.served_models import Models
from voltage_ray.protocol.common import ModelCard, ModelList

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Models"])
health_router = APIRouter(tags=["Health"])


def _cards(models: Models) -> list[ModelCard]:
    cards = []
    for model in models.config.models:
        for name in model.names:
            cards.append(ModelCard(id=name, kind=model.kind, root=model.id))
    return cards


@router.get("/models", summary="List models")
async def list_models(
    principal: Principal = Depends(get_principal), models: Models = Depends(get_models)
) -> Any:
    return JSONResponse(ModelList(data=_cards(models)).model_dump(mode="json"))


@router.get("/models/{model:path}", summary="Retrieve a model")
async def get_model(
    model: str,
    principal: Principal = Depends(get_principal),
    models: Models = Depends(get_models),
) -> Any:
    for card in _cards(models):
        if card.id == model:
            return JSONResponse(card.model_dump(mode="json"))
    raise NotFound(f"The model '{shown(model)}' does not exist")


@health_router.get("/health", summary="Readiness of every model deployment")
async def health(models: Models = Depends(get_models)) -> Any:
    ready = await models.readiness()
    if all(ready.values()):
        return JSONResponse({"status": "ok", "models": ready})
    waiting = sorted(name for name, ok in ready.items() if not ok)
    raise ServiceUnavailable(f"Models not ready: {', '.join(waiting)}", details={"models": ready})
