"""Bind the undecorated server classes into Serve deployments with their configured options
(the Ingress over them is bound by ``ingress/builder.py``)."""

from __future__ import annotations

import re

from ray import serve
from ray.serve import Application

from voltage_ray.config import AppConfig, ModelConfig, ModelKind


def server_class(kind: ModelKind) -> type:
    """The server class for a model kind (imported lazily: each pulls in its ML stack)."""
    if kind == "chat":
        from voltage_ray.deployments.chat import ChatServer

        return ChatServer
    if kind == "embeddings":
        from voltage_ray.deployments.embeddings import EmbeddingServer

        return EmbeddingServer
    if kind == "images":
        from voltage_ray.deployments.images import ImageServer

        return ImageServer
    raise ValueError(f"unknown model kind {kind!r}")


def deployment_name(model: ModelConfig) -> str:
    """A stable Serve deployment name, e.g. ``chat-SmolLM2-135M-Instruct``."""
    return f"{model.kind}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model.id)


def bind_model(model: ModelConfig, config: AppConfig) -> Application:
    cls = server_class(model.kind)
    if model.deployment.user_config is not None and not hasattr(cls, "reconfigure"):
        raise ValueError(f"model {model.id!r}: {model.kind} models take no user_config")
    deployment = serve.deployment(cls, name=deployment_name(model), **model.deployment.to_serve())
    return deployment.bind(model.model_dump(mode="json"), config.cache_dir)
