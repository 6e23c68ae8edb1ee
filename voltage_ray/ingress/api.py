"""The FastAPI app: error handlers, request ids, and every router under both prefixes.

The interactive docs (`/docs`, Swagger UI; `/redoc`, ReDoc) load their JavaScript and CSS from
the service itself, under `/docs/static`, so they work on an offline host: fastapi-offline ships
the assets and mounts them, in place of FastAPI's CDN-loading defaults. They need no API key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from voltage_ray import __version__
from voltage_ray.ingress import chat, completions, embeddings, errors, images, models, responses
from voltage_ray.ingress.guards import BodySizeLimit
from voltage_ray.ingress.observe import RequestMetrics

if TYPE_CHECKING:
    from voltage_ray.ingress.services import Services

PREFIXES = ("/v1", "/api/voltage/v1")
DOCS_STATIC = "/docs/static"  # Swagger UI's and ReDoc's assets, served by the app
DESCRIPTION = (
    "OpenAI-compatible endpoints served by Ray Serve. Authenticate with `X-VoltageGPU-Key` "
    "or `Authorization: Bearer`."
)


def create_api(ingress: Services) -> FastAPI:
    """Build the ASGI app for one Ingress replica (``ingress``: what the routes use of it)."""
    app = FastAPIOffline(
        title="VoltageGPU API",
        version=__version__,
        description=DESCRIPTION,
        static_url=DOCS_STATIC,
    )
    app.state.ingress = ingress
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=ingress.config.request_limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=ingress.metrics)  # outermost: counts 413s too
    app.include_router(models.health_router)
    for prefix in PREFIXES:
        app.include_router(chat.router, prefix=prefix)
        app.include_router(completions.router, prefix=prefix)
        app.include_router(responses.router, prefix=prefix)
        app.include_router(embeddings.router, prefix=prefix)
        app.include_router(images.router, prefix=prefix)
        app.include_router(models.router, prefix=prefix)
        app.include_router(models.health_router, prefix=prefix)
    return app
