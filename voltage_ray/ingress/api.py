"""The FastAPI app: error handlers, request ids, and every router under both prefixes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from voltage_ray import __version__
from voltage_ray.ingress import chat, embeddings, errors, images, models
from voltage_ray.ingress.guards import BodySizeLimit
from voltage_ray.ingress.observe import RequestMetrics

if TYPE_CHECKING:
    from voltage_ray.ingress.deployment import Ingress

PREFIXES = ("/v1", "/api/voltage/v1")
DESCRIPTION = (
    "OpenAI-compatible endpoints served by Ray Serve. Authenticate with `X-VoltageGPU-Key` "
    "or `Authorization: Bearer`."
)


def create_api(ingress: Ingress) -> FastAPI:
    """Build the ASGI app for one Ingress replica."""
    app = FastAPI(title="VoltageGPU API", version=__version__, description=DESCRIPTION)
    app.state.ingress = ingress
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=ingress.config.request_limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=ingress.metrics)  # outermost: counts 413s too
    app.include_router(models.health_router)
    for prefix in PREFIXES:
        app.include_router(chat.router, prefix=prefix)
        app.include_router(embeddings.router, prefix=prefix)
        app.include_router(images.router, prefix=prefix)
        app.include_router(models.router, prefix=prefix)
        app.include_router(models.health_router, prefix=prefix)
    return app
