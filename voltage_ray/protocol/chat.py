"""`POST /chat/completions` schemas: the spec's fields first, then OpenAI's extensions."""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from voltage_ray.protocol.common import (
    CompletionUsage,
    Metadata,
    RequestModel,
    ResponseModel,
    ServiceTier,
    require_unicode,
)
from voltage_ray.protocol.tools import (
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolCallIn,
    ToolCallOut,
    ToolChoice,
)

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class TextPart(RequestModel):
    """Extension (OpenAI): a text content part."""

    type: Literal["text"]
    text: str


class RefusalPart(RequestModel):
    """Extension (OpenAI): an earlier assistant message's refusal part, read as text."""

    type: Literal["refusal"]
    refusal: str


Content = str | list[TextPart | RefusalPart]


def _text(content: Content | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(RequestModel):
    """Spec `ChatMessage`, with OpenAI's extensions: the `developer` role (read as system where
    a model's chat template has no such role), `tool` messages answering ``tool_call_id``, and
    assistant messages carrying the ``tool_calls`` they made, their content then null or absent.
    """

    role: Role
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    refusal: str | None = None  # assistant

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: Content | None) -> Content | None:
        require_unicode(_text(v), "content")
        return v

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessage:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        elif isinstance(self.content, list) and any(
            isinstance(part, RefusalPart) for part in self.content
        ):
            raise ValueError("refusal content parts belong to assistant messages")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, need tool_call_id")
        return self

    @property
    def text(self) -> str:
        return _text(self.content)


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
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Token id (as a string, as JSON keys are) -> bias added to its logit.
    logit_bias: dict[str, float] | None = None
    # Extension (vLLM): a regex, a choice or a JSON schema the text must match.
    structured_outputs: StructuredOutputs | None = None
    # OpenAI's, accepted and ignored: storage, billing and caching hints of OpenAI's platform.
    store: bool | None = None
    metadata: Metadata | None = Field(default=None, max_length=16)
    service_tier: ServiceTier | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    moderation: dict[str, Any] | None = None
    # OpenAI's, refused unless they ask for what the server does anyway (REFUSED).
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    functions: Any = None
    function_call: Any = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "modalities": ("this server answers in text only", (["text"],)),
        "audio": ("this server answers in text only", ()),
        "prediction": ("predicted outputs are not implemented", ()),
        "web_search_options": ("this server does not search the web", ()),
        "reasoning_effort": ("the served models do not reason before answering", ("none",)),
        "verbosity": ("the served models have no verbosity setting", ("medium",)),
        "functions": ("use tools (functions is OpenAI's deprecated form)", ()),
        "function_call": ("use tool_choice (function_call is OpenAI's deprecated form)", ()),
    }

    _stop = field_validator("stop")(lambda cls, v: check_stop(v))
    _logit_bias = field_validator("logit_bias")(lambda cls, v: check_logit_bias(v))

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        self._check_tools()
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    def _check_tools(self) -> None:
        if self.structured_outputs is not None and (
            self.tool_mode in ("required", "named")
            or (self.response_format is not None and self.response_format.type != "text")
        ):
            raise ValueError(
                "structured_outputs cannot be combined with a JSON response_format or a forced "
                "tool_choice: send one constraint"
            )
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice names the function {choice.function.name!r}, which is not one of "
                f"the tools ({', '.join(names) or 'none given'})"
            )

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How tools are used: not at all, parsed from free text, or enforced by a grammar."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools a call must be made to (required: any of them; named: that one)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return list(self.tools or []) if choice == "required" else []

    @property
    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (0 to 20)."""
        return (self.top_logprobs or 0) if self.logprobs else None

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


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(ResponseModel):
    """OpenAI's `ChatCompletionTokenLogprob`: a chosen token and its most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(ResponseModel):
    """OpenAI's `ChatCompletionResponseMessage`: ``content`` and ``refusal`` are always sent
    (null when empty), ``tool_calls`` only when the model called tools."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class Choice(ResponseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(ResponseModel):
    """Spec `ChatCompletionResponse`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class FunctionDelta(ResponseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler(self))


class ToolCallDelta(ResponseModel):
    """A piece of a streamed tool call: ``index``, ``id``, ``type`` and the name come first, then
    fragments of the arguments' JSON text (OpenAI's `ChatCompletionMessageToolCallChunk`)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler(self))


class Delta(ResponseModel):
    """A chunk's delta, as OpenAI sends it: `role` only in the first, `{}` in the finish chunk.

    Its unset (None) fields are left out when serialized; the chunk's other nulls
    (`finish_reason`, `logprobs`, `usage`) are kept.
    """

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler(self))


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


class ChunkChoice(ResponseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(ResponseModel):
    """One SSE frame of a streamed completion (OpenAI's `chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


def check_stop(v: str | list[str] | None) -> str | list[str] | None:
    """``stop`` of chat and completions: at most MAX_STOP_SEQUENCES, none empty, valid text."""
    items = [v] if isinstance(v, str) else (v or [])
    if len(items) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences")
    if any(s == "" for s in items):
        raise ValueError("stop sequences must not be empty")
    for item in items:
        require_unicode(item, "stop")
    return v


def check_logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    """``logit_bias`` of chat and completions: token-id keys, values in [-100, 100]."""
    for key, bias in (v or {}).items():
        if not key.isdigit():
            raise ValueError(f"logit_bias keys must be token ids; got {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100]; got {bias} for {key}")
    return v


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
