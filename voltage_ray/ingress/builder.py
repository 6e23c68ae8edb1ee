"""Bind the Ingress deployment over one bound deployment per model (``deployments/builder.py``),
with the options of the validated config: the application ``app.build_app`` returns."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from voltage_ray.config import AppConfig
from voltage_ray.deployments.builder import bind_model, deployment_name
from voltage_ray.ingress.deployment import Ingress


def bind_ingress(config: AppConfig) -> Application:
    handles: dict[str, Any] = {m.id: bind_model(m, config) for m in config.models}
    names = {m.id: deployment_name(m) for m in config.models}
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="Ingress", **config.ingress.deployment.to_serve()
    )
    return ingress.bind(config.model_dump(mode="json"), handles, names)
