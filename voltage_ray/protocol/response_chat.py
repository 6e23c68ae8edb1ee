"""A Responses request served as the chat request the engines already serve, and chat's stream
chunks read back as the Responses deltas that :class:`~response_stream.ResponseBuilder` turns
into events.

One generation path for both APIs (as vLLM's `serving_responses.py` renders a Responses request
into chat messages for the same engine): keys, limits, metering, failover, deadlines, tool
parsing and grammars are chat's. What chat cannot say is carried here:

- a forced **custom** tool (``tool_choice`` naming one): the model writes the tool's input as
  plain text, constrained by the tool's Lark or regex grammar where it has one (chat's
  ``structured_outputs`` extension), and the whole text becomes one ``custom_tool_call``;
- a custom tool the model may call (``auto`` / ``required``) is offered as a function taking one
  string, ``input``, and the call's JSON is unwrapped back into the tool's text. Its grammar is
  then not enforced (the call is read from free text, as every ``auto`` call is);
- namespaced tools are offered as ``namespace.name`` and split back by the builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter

from voltage_ray.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    StreamOptions,
)
from voltage_ray.protocol.response_events import ResponseUsage
from voltage_ray.protocol.response_items import InputItem, chat_messages
from voltage_ray.protocol.response_stream import (
    Done,
    GenerationDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)
from voltage_ray.protocol.response_tools import CustomGrammarFormat, OfferedTool, custom_input
from voltage_ray.protocol.responses import CreateResponseRequest, ResponseInputs
from voltage_ray.protocol.tools import StructuredOutputs

ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])
CHAT_TIERS = ("auto", "default", "flex", "scale", "priority")


def parse_items(resources: list[dict[str, Any]]) -> list[InputItem]:
    """Stored item resources (``item_resource``'s dicts, output items alike) as input items."""
    return ITEMS.validate_python([_as_input(r) for r in resources])


def _as_input(resource: dict[str, Any]) -> dict[str, Any]:
    """An output item (a message with ``output_text`` parts and their annotations, a call) as
    the input item that sends it back, as clients do."""
    if resource.get("type") == "message":
        parts = [
            {"type": p["type"], "text": p.get("text", "")}
            if p.get("type") in ("input_text", "output_text")
            else p
            for p in resource.get("content", [])
        ]
        return {**resource, "content": parts}
    return resource


def forced_custom(request: ResponseInputs) -> OfferedTool | None:
    """The custom tool ``tool_choice`` names, whose input is the whole answer; else None."""
    forced = request.forced_tools if request.tool_mode == "named" else []
    return forced[0] if forced and forced[0].kind == "custom" else None


def messages_of(request: ResponseInputs, items: list[InputItem]) -> list[ChatMessage]:
    """The chat messages of ``instructions`` and ``items`` (a 400 when there are none)."""
    messages = chat_messages(items, request.instructions)
    if not messages:
        raise ValueError("input is empty: there is nothing for the model to answer")
    return messages


def chat_request(
    request: CreateResponseRequest, items: list[InputItem], model: str
) -> ChatCompletionRequest:
    """The streamed chat request that generates ``request``'s answer from the conversation
    ``items`` (a previous response's items first). Built from checked parts, unchecked as a
    whole: a namespaced tool's name holds a dot, which chat's own requests may not send."""
    custom = forced_custom(request)
    fields: dict[str, Any] = dict(
        model=model,
        messages=messages_of(request, items),
        stream=True,
        stream_options=StreamOptions(include_usage=True),
        temperature=request.temperature,
        top_p=request.top_p,
        max_completion_tokens=request.max_output_tokens,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs_count if request.logprobs else None,
        user=request.user,
        service_tier=request.service_tier if request.service_tier in CHAT_TIERS else None,
        parallel_tool_calls=request.parallel_tool_calls,
    )
    if custom is not None:
        fmt = custom.format
        if isinstance(fmt, CustomGrammarFormat):
            grammar = {"grammar" if fmt.syntax == "lark" else "regex": fmt.definition}
            fields["structured_outputs"] = StructuredOutputs.model_validate(grammar)
    else:
        tools = request.chat_tools()
        if tools and request.tool_mode != "none":
            fields["tools"] = tools
            fields["tool_choice"] = request.chat_tool_choice
        fields["response_format"] = request.response_format
    return ChatCompletionRequest.model_construct(**{**defaults(ChatCompletionRequest), **fields})


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Every optional field of ``model`` at its default (``model_construct`` fills in none but
    those it is given)."""
    return {
        name: f.get_default(call_default_factory=True)
        for name, f in model.model_fields.items()
        if not f.is_required()
    }


@dataclass
class _Call:
    name: str
    call_id: str | None
    custom: bool
    arguments: list[str] = field(default_factory=list)


class ChunkReader:
    """Chat stream chunks (one choice) in, Responses deltas out.

    A function call's arguments pass through as they stream; a custom tool's JSON call is held
    until it ends, then sent as the tool's text. ``forced``: a forced custom tool, whose input is
    the whole text. The finish chunk's reason waits for the usage chunk after it, which ends
    the response with :class:`Done`.
    """

    def __init__(self, request: ResponseInputs, forced: OfferedTool | None = None) -> None:
        self.request = request
        self.forced = forced
        self._call: _Call | None = None
        self._forced_open = False
        self._finish: str | None = None

    def feed(self, chunk: ChatCompletionChunk) -> list[GenerationDelta]:
        out: list[GenerationDelta] = []
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content or (choice.logprobs and choice.logprobs.content):
                out += self._text(delta.content or "", choice.logprobs)
            for call in delta.tool_calls or []:
                function = call.function
                if function is not None and function.name:
                    out += self._end_call()
                    tool = self.request.tool(function.name)
                    custom = tool is not None and tool.kind == "custom"
                    self._call = _Call(function.name, call.id, custom)
                    if not custom:
                        out.append(ToolCallStart(function.name, call.id))
                if function is not None and function.arguments and self._call is not None:
                    if self._call.custom:
                        self._call.arguments.append(function.arguments)
                    else:
                        out.append(ToolCallDelta(function.arguments))
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
        if chunk.usage is not None and not chunk.choices:
            out += self._end_call()
            if self.forced is not None and not self._forced_open:
                out += self._open_forced()
            usage = chunk.usage
            cached = usage.prompt_tokens_details.cached_tokens
            reason = self._finish or "stop"
            if self.forced is not None and reason == "stop":
                reason = "tool_calls"
            out.append(
                Done(
                    reason,  # type: ignore[arg-type]
                    ResponseUsage.of(usage.prompt_tokens, usage.completion_tokens, cached),
                )
            )
        return out

    def _text(self, text: str, logprobs: Any) -> list[GenerationDelta]:
        if self.forced is not None:
            opened = [] if self._forced_open else self._open_forced()
            return [*opened, ToolCallDelta(text)] if text else opened
        scored = list(logprobs.content) if logprobs is not None and logprobs.content else []
        return [TextDelta(text, scored)]

    def _open_forced(self) -> list[GenerationDelta]:
        assert self.forced is not None
        self._forced_open = True
        return [ToolCallStart(self.forced.exposed, kind="custom")]

    def _end_call(self) -> list[GenerationDelta]:
        call, self._call = self._call, None
        if call is None or not call.custom:
            return []
        text = custom_input("".join(call.arguments))
        start = ToolCallStart(call.name, call.call_id, kind="custom")
        return [start, ToolCallDelta(text)] if text else [start]
