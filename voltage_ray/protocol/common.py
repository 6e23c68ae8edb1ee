"""Schemas shared by every endpoint: usage, the model list, the error body."""

from __future__ import annotations

import re
import time
import types
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

UnknownFields = Literal["reject", "ignore"]
_unknown_fields: UnknownFields = "reject"


def set_unknown_fields(mode: UnknownFields) -> None:
    """How every request model of this process treats a field it does not know (the ingress
    sets it from ``ingress.unknown_fields``): a 400, or dropped."""
    global _unknown_fields
    _unknown_fields = mode


_SURROGATE = re.compile("[\ud800-\udfff]")


def require_unicode(text: str, what: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: a ValueError."""
    if _SURROGATE.search(text):
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)")


def unicode_everywhere(value: Any, where: str = "") -> None:
    """:func:`require_unicode` on every string inside a JSON value (keys included), naming the
    first one that fails by its path, e.g. ``messages[0].content``."""
    if isinstance(value, str):
        require_unicode(value, where or "a value")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                require_unicode(key, f"a key of {where}" if where else "a key")
            unicode_everywhere(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            unicode_everywhere(item, f"{where}[{i}]")


def admits_none(annotation: Any) -> bool:
    """Whether a field's type accepts ``None`` itself (``X | None``, ``Optional``, ``Any``)."""
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return admits_none(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(admits_none(arg) for arg in get_args(annotation))
    if origin is Literal:
        return None in get_args(annotation)
    return False


class RequestModel(BaseModel):
    """Base for request bodies, strict about JSON types as OpenAI is.

    Unknown fields are a 400 (or dropped: :func:`set_unknown_fields`). Fields OpenAI documents
    that do not change what this server produces are declared with their types and ignored;
    those that would and cannot be honoured are listed in ``REFUSED`` (name: why, and the
    values that ask nothing of the server): any other value is a 400 naming the field.

    ``strict=True`` holds in Python mode too, which is how FastAPI
    validates the parsed body: a boolean is not a number, a string is not a number or a boolean,
    a number is not a string, and a float (even ``1.0``) is not an integer; an integer is still a
    valid float. A JSON ``null`` on a field with a default means "unset" (the default applies),
    as OpenAI reads it; ``null`` on a required field stays an error.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)
    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {}

    @field_validator("*")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        refused = cls.REFUSED.get(info.field_name or "")
        if refused is not None and value is not None and value not in refused[1]:
            raise ValueError(f"{info.field_name} is not supported: {refused[0]}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unicode_everywhere(data)  # no string of a request may break a tokenizer or a renderer
        fields = cls.model_fields
        if _unknown_fields == "ignore" and not data.keys() <= fields.keys():
            data = {k: v for k, v in data.items() if k in fields}
        if all(value is not None for value in data.values()):
            return data
        unset = {
            key
            for key, value in data.items()
            if value is None
            and key in fields
            and not fields[key].is_required()
            and not admits_none(fields[key].annotation)
        }
        return {k: v for k, v in data.items() if k not in unset} if unset else data


# OpenAI's documented fields that ask nothing this server's output depends on: accepted with
# their types, ignored (README: "Fields OpenAI accepts").
Metadata = dict[str, str]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class ResponseModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Usage(ResponseModel):
    """Spec `Usage`: real token counts from the model's tokenizer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class PromptTokensDetails(ResponseModel):
    """OpenAI's ``usage.prompt_tokens_details``: prompt tokens the engine's prefix cache held
    (still counted in ``prompt_tokens``, and billed as such)."""

    cached_tokens: int = 0


class CompletionUsage(Usage):
    """The usage of a chat completion or completion: the spec's counts and, as OpenAI's,
    ``prompt_tokens_details.cached_tokens``."""

    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


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
