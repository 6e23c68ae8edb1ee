"""The Responses API's output: the `Response` object, its items and stream events, and the one
builder that makes both from a generation's deltas, so the JSON and the SSE agree by construction.

OpenAI's shapes (openapi.yaml at openai/openai-openapi f85dbe2: `Response`, `OutputItem`,
`ResponseStreamEvent`, `TokenCountsResource`; the unit tests hold every output against them).
Facts relied on:

- An `output_text` part always has `annotations` and `logprobs` (``[]`` when none); a part's
  logprobs are `LogProb` (``bytes`` a required list), a text event's `ResponseLogProb` (none).
- `usage.input_tokens_details` needs `cache_write_tokens` beside `cached_tokens`. `usage`,
  `user` and a call's `namespace` are not nullable: left out when unset.
- The delete answer has no schema, only the example ``{"id", "object": "response",
  "deleted": true}``.
- The event order (OpenAI's, and vLLM's `serving_responses.py`): `response.created`,
  `response.in_progress`; per output item `response.output_item.added`, then for a message
  `content_part.added`, `output_text.delta`..., `output_text.done`, `content_part.done`, for a
  call its `*.delta`s and `*.done`, then `response.output_item.done`; last
  `response.completed`, `.incomplete` or `.failed` carrying the whole Response.
  `sequence_number` counts from 0.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from voltage_ray.protocol.chat import TokenLogprob
from voltage_ray.protocol.common import ResponseModel
from voltage_ray.protocol.response_items import ItemStatus, new_call_id, new_id
from voltage_ray.protocol.response_tools import FunctionTool, NamespaceTool
from voltage_ray.protocol.responses import CreateResponseRequest

ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class _Sparse(ResponseModel):
    """A model whose ``OMIT_NONE`` fields are left out when None (OpenAI's schema types them
    without null)."""

    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.OMIT_NONE}


# --- output items -------------------------------------------------------------------------


class TopLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(ResponseModel):
    """OpenAI's `LogProb`: a token of an output text part and its likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb]

    @classmethod
    def of(cls, t: TokenLogprob) -> LogProb:
        tops = [
            TopLogProb(token=a.token, logprob=a.logprob, bytes=_bytes(a)) for a in t.top_logprobs
        ]
        return cls(token=t.token, logprob=t.logprob, bytes=_bytes(t), top_logprobs=tops)


def _bytes(t: Any) -> list[int]:
    return list(t.bytes) if t.bytes is not None else list(t.token.encode())


class DeltaTopLogProb(ResponseModel):
    token: str
    logprob: float


class DeltaLogProb(ResponseModel):
    """OpenAI's `ResponseLogProb`, the logprobs of a text event."""

    token: str
    logprob: float
    top_logprobs: list[DeltaTopLogProb]

    @classmethod
    def of(cls, t: TokenLogprob) -> DeltaLogProb:
        tops = [DeltaTopLogProb(token=a.token, logprob=a.logprob) for a in t.top_logprobs]
        return cls(token=t.token, logprob=t.logprob, top_logprobs=tops)


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[LogProb] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    id: str = Field(default_factory=lambda: new_id("msg"))
    type: Literal["message"] = "message"
    status: ItemStatus = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallItem(_Sparse):
    """A call of a function tool: ``name`` and ``namespace`` apart, as OpenAI's."""

    OMIT_NONE = ("namespace",)

    id: str = Field(default_factory=lambda: new_id("fc"))
    type: Literal["function_call"] = "function_call"
    status: ItemStatus = "in_progress"
    call_id: str = Field(default_factory=new_call_id)
    name: str
    namespace: str | None = None
    arguments: str = ""


class CustomToolCallItem(_Sparse):
    OMIT_NONE = ("namespace",)

    id: str = Field(default_factory=lambda: new_id("ctc"))
    type: Literal["custom_tool_call"] = "custom_tool_call"
    status: ItemStatus = "in_progress"
    call_id: str = Field(default_factory=new_call_id)
    name: str
    namespace: str | None = None
    input: str = ""


OutputItem = OutputMessage | FunctionCallItem | CustomToolCallItem


# --- the response -------------------------------------------------------------------------


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0  # held by the engine's prefix cache, still counted as input
    cache_write_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached: int = 0) -> ResponseUsage:
        return cls(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        )


class ResponseError(ResponseModel):
    code: str  # one of OpenAI's `ResponseErrorCode`s: server_error here
    message: str


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(_Sparse):
    """OpenAI's `Response`: the output, its status and usage, and the request's parameters
    echoed as OpenAI echoes them (the tools offered, hosted ones left out)."""

    OMIT_NONE = ("usage", "user")

    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: ResponseStatus = "in_progress"
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    safety_identifier: str | None = None
    service_tier: str = "default"
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = Field(
        default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"}
    )
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, request: CreateResponseRequest, **fields: Any) -> Response:
        """A response to ``request`` (``fields``: the id, model, status, ... it starts with)."""
        r = request
        reasoning = r.reasoning
        echo: dict[str, Any] = dict(
            background=r.background,
            instructions=r.instructions,
            max_output_tokens=r.max_output_tokens,
            max_tool_calls=r.max_tool_calls,
            model=r.model,
            parallel_tool_calls=r.parallel_tool_calls,
            previous_response_id=r.previous_response_id,
            prompt_cache_key=r.prompt_cache_key,
            safety_identifier=r.safety_identifier,
            store=r.store,
            temperature=r.temperature,
            tool_choice=_dumped(r.tool_choice) if r.tool_choice is not None else "auto",
            tools=_echo_tools(r),
            top_logprobs=r.top_logprobs or 0,
            top_p=r.top_p,
            truncation=r.truncation,
            user=r.user,
            metadata=r.metadata or {},
        )
        if reasoning is not None:
            summary = reasoning.summary or reasoning.generate_summary
            echo["reasoning"] = {"effort": reasoning.effort, "summary": summary}
        if r.text is not None and r.text.format is not None:
            echo["text"] = {"format": _dumped(r.text.format), "verbosity": "medium"}
        return cls(**{**echo, **fields})


def _dumped(value: Any) -> Any:
    return (
        value.model_dump(exclude_none=True, by_alias=True)
        if hasattr(value, "model_dump")
        else value
    )


def _echo_tools(request: CreateResponseRequest) -> list[dict[str, Any]]:
    """The function, namespace and custom tools, as OpenAI echoes them: a function with its
    ``parameters`` (null when none) and its effective ``strict``."""

    def function(tool: FunctionTool) -> dict[str, Any]:
        data = _dumped(tool)
        return {**data, "parameters": tool.parameters, "strict": tool.strict is not False}

    out = []
    for tool in request.tools or []:
        if isinstance(tool, FunctionTool):
            out.append(function(tool))
        elif isinstance(tool, NamespaceTool):
            inner = [function(t) if isinstance(t, FunctionTool) else _dumped(t) for t in tool.tools]
            out.append({**_dumped(tool), "tools": inner})
        elif tool.type == "custom":
            out.append(_dumped(tool))
    return out


class ResponseDeleted(ResponseModel):
    """The answer to `DELETE /responses/{id}` (OpenAI documents it by example only)."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputTokens(ResponseModel):
    """OpenAI's `TokenCountsResource`, the answer to `POST /responses/input_tokens`."""

    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


# --- stream events ------------------------------------------------------------------------


class _Event(ResponseModel):
    type: str
    sequence_number: int


class LifecycleEvent(_Event):
    """The response as it stands: created, queued, in progress, and as it ended."""

    type: Literal[
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: Response


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[DeltaLogProb]


class TextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[DeltaLogProb]


class CallDeltaEvent(_Event):
    """A piece of a function call's JSON arguments or of a custom tool call's input."""

    type: Literal["response.function_call_arguments.delta", "response.custom_tool_call_input.delta"]
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class InputDoneEvent(_Event):
    type: Literal["response.custom_tool_call_input.done"] = "response.custom_tool_call_input.done"
    item_id: str
    output_index: int
    input: str


class ErrorEvent(_Event):
    """OpenAI's `error` event: a failure the stream reports outside any response."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


Event = (
    LifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | CallDeltaEvent
    | ArgumentsDoneEvent
    | InputDoneEvent
    | ErrorEvent
)


def sse(event: Event) -> str:
    """One event as OpenAI frames it: an ``event:`` line with its type, then its JSON."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
