"""Schemas shared by every endpoint: usage, the model list, the error body."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def require_unicode(text: str, what: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


class RequestModel(BaseModel):
    """Base for request bodies: unknown fields are a 400, as OpenAI answers them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ResponseModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Usage(ResponseModel):
    """Spec `Usage`: real token counts from the model's tokenizer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(ResponseModel):
    """One entry of `GET /v1/models`, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "voltage_ray"
    # Extensions: what the entry is and, for an alias, the model it reaches.
    kind: str
    root: str


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetails(ResponseModel):
    model_config = ConfigDict(extra="allow")

    status: int
    endpoint: str


class ErrorBody(ResponseModel):
    """Spec `Error`: `{"error": message, "details": {"status", "endpoint", ...}}`."""

    error: str
    details: ErrorDetails

    @classmethod
    def make(cls, message: str, status: int, endpoint: str, **extra: Any) -> dict[str, Any]:
        return {"error": message, "details": {"status": status, "endpoint": endpoint, **extra}}
