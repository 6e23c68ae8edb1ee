"""`POST /completions` schemas (OpenAI's legacy text completions; the spec is silent on them).

Fields in OpenAI's order (`CreateCompletionRequest`). The prompt is text, a list of texts, token
ids, or a list of token-id lists; every prompt gets ``n`` choices, indexed prompt by prompt.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from voltage_ray.protocol.chat import StreamOptions, check_logit_bias, check_stop
from voltage_ray.protocol.common import (
    CompletionUsage,
    RequestModel,
    ResponseModel,
    require_unicode,
)

MAX_LOGPROBS = 5
MAX_PROMPTS = 64  # prompts in one request (OpenAI: no documented limit)

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(RequestModel):
    """OpenAI's `CreateCompletionRequest`."""

    model: str
    prompt: Prompt
    best_of: int | None = Field(default=None, ge=1, le=20)
    echo: bool = False
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int = Field(default=16, ge=0)
    n: int = Field(default=1, ge=1, le=10)  # as chat (the spec's limit); OpenAI allows 128
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused when set (a 400 naming it): insertion needs a model trained for it.
    suffix: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, str):
            require_unicode(v, "prompt")
            return v
        if not v:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(x, int) for x in v):  # one prompt of token ids
            if any(isinstance(x, int) and x < 0 for x in v):
                raise ValueError("token ids must not be negative")
            return v
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"prompt may hold at most {MAX_PROMPTS} prompts")
        for item in v:
            if isinstance(item, str):
                require_unicode(item, "prompt")
            elif not item:
                raise ValueError("a token-id prompt must not be empty")
            elif isinstance(item, list) and min(item) < 0:
                raise ValueError("token ids must not be negative")
        return v

    _stop = field_validator("stop")(lambda cls, v: check_stop(v))
    _logit_bias = field_validator("logit_bias")(lambda cls, v: check_logit_bias(v))

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix is not None:
            raise ValueError("suffix is not supported: this server does not insert text")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                "best_of must equal n: this server returns every choice it generates"
                if self.best_of > self.n
                else "best_of must be at least n"
            )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo (to score the prompt)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionLogprobs(ResponseModel):
    """OpenAI's legacy logprobs: parallel lists per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionResponse(ResponseModel):
    """A `text_completion` object: the whole answer, or one stream chunk (same shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
