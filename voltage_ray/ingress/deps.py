"""The collaborators routes are handed, with FastAPI's ``Depends``: who calls (``auth.Auth``),
the request's :class:`~.meter.Meter` (admission, recording and delivery of its usage), the
served :class:`~.served_models.Models`, and the stored responses. The replica's are kept in
``app.state`` by ``api.create_api``; a request's meter in its scope, by the middleware that
delivers it (``settlement.py``)."""

from __future__ import annotations

from fastapi import Request

from voltage_ray.config import AppConfig
from voltage_ray.ingress.auth import Auth
from voltage_ray.ingress.meter import METER, Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.limits.client import ResponsesClient
from voltage_ray.limits.limiter import Principal


async def get_principal(request: Request) -> Principal:
    """The authenticated caller; Unauthorized (401) otherwise."""
    auth: Auth = request.app.state.auth
    return await auth.caller(request)


def get_models(request: Request) -> Models:
    models: Models = request.app.state.models
    return models


def get_meter(request: Request) -> Meter:
    """This request's meter (made by ``settlement.SettleBeforeLastByte``)."""
    meter: Meter = request.scope[METER]
    return meter


def get_config(request: Request) -> AppConfig:
    config: AppConfig = request.app.state.config
    return config


def get_responses(request: Request) -> ResponsesClient:
    """The stored responses (in the service's database, through the limiter)."""
    responses: ResponsesClient = request.app.state.responses
    return responses
