"""The FastAPI app: error handlers, request ids, metering, and every router under both prefixes.

The routes are handed the replica's collaborators (``deps.py``), kept in ``app.state``: ``auth``,
``models``, ``config``, ``responses`` (the stored responses) and ``runs`` (background runs).

The interactive docs (`/docs`, Swagger UI; `/redoc`, ReDoc) load their JavaScript and CSS from
the service itself, under `/docs/static`, so they work on an offline host: fastapi-offline ships
the assets and mounts them, in place of FastAPI's CDN-loading defaults. They need no API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from voltage_ray import __version__
from voltage_ray.config import AppConfig
from voltage_ray.ingress import chat, completions, embeddings, errors, images, models, responses
from voltage_ray.ingress.auth import Auth
from voltage_ray.ingress.guards import BodySizeLimit
from voltage_ray.ingress.meter import Admissions
from voltage_ray.ingress.observe import RequestMetrics
from voltage_ray.ingress.response_runs import BackgroundRuns
from voltage_ray.ingress.served_models import Models
from voltage_ray.ingress.settlement import SettleBeforeLastByte
from voltage_ray.limits.idempotency import max_answer_bytes
from voltage_ray.metrics import IngressMetrics

PREFIXES = ("/v1", "/api/voltage/v1")
DOCS_STATIC = "/docs/static"  # Swagger UI's and ReDoc's assets, served by the app
DESCRIPTION = (
    "OpenAI-compatible endpoints served by Ray Serve. Authenticate with `X-VoltageGPU-Key` "
    "or `Authorization: Bearer`."
)


def create_api(
    config: AppConfig,
    metrics: IngressMetrics,
    *,
    auth: Auth,
    served: Models,
    admissions: Admissions,
    stored: Any = None,
    runs: BackgroundRuns | None = None,
) -> FastAPI:
    """Build the ASGI app for one Ingress replica, over its collaborators (``served``: the
    models; ``stored``: the stored responses)."""
    app = FastAPIOffline(
        title="VoltageGPU API",
        version=__version__,
        description=DESCRIPTION,
        static_url=DOCS_STATIC,
    )
    app.state.config = config
    app.state.auth = auth
    app.state.models = served
    app.state.responses = stored
    app.state.runs = runs
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.request_limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # counts 413s too
    # NOTE: added last, so outermost: it sees the final status and the body's last byte.
    kept = max_answer_bytes(config.limits.idempotency_max_mb)  # the limiter keeps no larger
    app.add_middleware(SettleBeforeLastByte, admissions=admissions, max_answer_bytes=kept)
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
