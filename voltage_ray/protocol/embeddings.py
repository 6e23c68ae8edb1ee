"""`POST /embeddings` schemas: the spec's fields first, then OpenAI's where the spec is silent.

Checks that need only the request live here (input shape, empty strings, ranges); checks that need
the model (sequence length, width for ``dimensions``) are made by the EmbeddingServer.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from voltage_ray.protocol.common import RequestModel, ResponseModel, Usage

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request


class EmbeddingRequest(RequestModel):
    """Spec `EmbeddingRequest`."""

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, 1..2048 non-empty strings, or token ids: one array of ids, or "
        "1..2048 non-empty arrays (ids in the model's own tokenizer)."
    )
    # Extensions (OpenAI), where the spec is silent.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        # A before-validator, so a bad item gets one clear message instead of pydantic's
        # per-branch union errors.
        if isinstance(v, str):
            items: list[Any] = [v]
        elif isinstance(v, list):
            if v and all(_is_id(x) for x in v):  # one array of token ids
                _check_ids(v, "input")
                return v
            if not 1 <= len(v) <= MAX_INPUTS:
                raise ValueError(f"input must hold 1 to {MAX_INPUTS} items, got {len(v)}")
            items = v
        else:
            raise ValueError("input must be a string, an array of strings or token ids")
        kinds = {isinstance(item, list) for item in items}
        if len(kinds) > 1:
            raise ValueError("input must hold only strings or only token-id arrays")
        for i, item in enumerate(items):
            where = "input" if isinstance(v, str) else f"input[{i}]"
            if isinstance(item, list):
                _check_ids(item, where)
                continue
            if not isinstance(item, str):
                raise ValueError(f"{where} must be a string, got {type(item).__name__}")
            if not item:
                raise ValueError(f"{where} must not be empty")
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:  # JSON allows a lone surrogate escape; UTF-8 not
                    raise ValueError(f"{where} is not valid Unicode") from None
        return v

    @property
    def inputs(self) -> list[str | list[int]]:
        """Each input: a text, or a token-id array."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]

    @property
    def token_upper_bound(self) -> int:
        """At most this many tokens, without a tokenizer: every token of a BPE, WordPiece or
        byte-fallback tokenizer covers at least one UTF-8 byte (special tokens not counted); a
        token-id array is its ids."""
        return sum(
            len(item.encode("utf-8")) if isinstance(item, str) else len(item)
            for item in self.inputs
        )


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ids(ids: list[Any], where: str) -> None:
    if not ids:
        raise ValueError(f"{where} must not be empty")
    if not all(_is_id(t) for t in ids):
        raise ValueError(f"{where} must hold only integer token ids")
    if min(ids) < 0:
        raise ValueError(f"{where}: token ids must not be negative")


class Embedding(ResponseModel):
    """One item of the spec's `EmbeddingResponse.data`."""

    object: Literal["embedding"] = "embedding"
    # A list of floats, or (encoding_format=base64) little-endian float32 bytes in base64.
    embedding: list[float] | str
    index: int


class EmbeddingResponse(ResponseModel):
    """Spec `EmbeddingResponse`."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as the response carries it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    floats: list[float] = np.asarray(vector, dtype=np.float32).tolist()
    return floats


def build_response(
    vectors: np.ndarray, *, model: str, prompt_tokens: int, encoding_format: str
) -> EmbeddingResponse:
    data = [
        Embedding(embedding=encode_vector(row, encoding_format), index=i)
        for i, row in enumerate(vectors)
    ]
    usage = Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingResponse(data=data, model=model, usage=usage)
