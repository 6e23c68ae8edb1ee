"""`POST /chat/completions` schemas: the spec's fields first, then OpenAI's extensions."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from voltage_ray.protocol.common import RequestModel, ResponseModel, Usage, require_unicode

MAX_STOP_SEQUENCES = 4


class TextPart(RequestModel):
    """Extension (OpenAI): a text content part."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """Spec `ChatMessage`."""

    role: Literal["system", "user", "assistant"]
    # Extension (OpenAI): content may also be a list of text parts.
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        texts = [v] if isinstance(v, str) else [part.text for part in v]
        for text in texts:
            require_unicode(text, "content")
        return v

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    """Extension (OpenAI)."""

    include_usage: bool = False


class ChatCompletionRequest(RequestModel):
    """Spec `ChatCompletionRequest`."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=10)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    # Extensions (OpenAI), where the spec is silent.
    stream_options: StreamOptions | None = None
    seed: int | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        for item in items:
            require_unicode(item, "stop")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


FinishReason = Literal["stop", "length", "content_filter"]


class ResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(ResponseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: None = None  # OpenAI's field; log probabilities are not offered.


class ChatCompletionResponse(ResponseModel):
    """Spec `ChatCompletionResponse`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(ResponseModel):
    """A chunk's delta, as OpenAI sends it: `role` only in the first, `{}` in the finish chunk.

    Its unset (None) fields are left out when serialized; the chunk's other nulls
    (`finish_reason`, `logprobs`, `usage`) are kept.
    """

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(ResponseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(ResponseModel):
    """One SSE frame of a streamed completion (OpenAI's `chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
