"""FastAPI dependencies shared by the routers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from voltage_ray.ingress.services import Services
    from voltage_ray.limits.limiter import Principal


def get_ingress(request: Request) -> Services:
    """The Ingress replica serving this app, as the routes see it."""
    return request.app.state.ingress


async def get_principal(request: Request) -> Principal:
    """The authenticated caller; Unauthorized (401) otherwise."""
    return await get_ingress(request).authenticate(request)
