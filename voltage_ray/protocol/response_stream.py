"""From one generation's deltas to a Response and its stream of events, in one place.

The route feeds :class:`ResponseBuilder` what the engine made, as small engine-neutral
deltas (text with its logprobs, the start of a tool call and pieces of its arguments, the end);
the builder answers each with OpenAI's events, numbered, every item with its ``output_index``,
``content_index`` and ``item_id``, and keeps the :class:`Response` they describe.
:func:`build_response` runs the same builder for a JSON answer, so the JSON and the stream's
final ``response.completed`` agree by construction (vLLM's `serving_responses.py` builds the
events in one generator the same way).

A tool call names the tool as the model saw it (``namespace.name`` for a namespaced one); the
builder splits it back with the request's tools, and gives a call the request does not declare
its name as written. A custom tool's deltas are its raw input text: where the model wrote it
as a function call's JSON, the route unwraps it first (``response_tools.custom_input``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from voltage_ray.protocol.chat import TokenLogprob
from voltage_ray.protocol.response_events import (
    ArgumentsDoneEvent,
    CallDeltaEvent,
    ContentPartEvent,
    CustomToolCallItem,
    DeltaLogProb,
    ErrorEvent,
    Event,
    FinishReason,
    FunctionCallItem,
    IncompleteDetails,
    InputDoneEvent,
    LifecycleEvent,
    LogProb,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from voltage_ray.protocol.response_items import new_call_id
from voltage_ray.protocol.responses import CreateResponseRequest


@dataclass(frozen=True)
class TextDelta:
    """Answer text; ``logprobs``: its tokens' (reported where the request includes them)."""

    text: str
    logprobs: Sequence[TokenLogprob] = ()


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: ``name`` as the model called it; ``call_id`` None makes one;
    ``kind`` None takes the request's tool's (a function where the request has none)."""

    name: str
    call_id: str | None = None
    kind: Literal["function", "custom"] | None = None


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the open call's JSON arguments (a function) or of its input (a custom tool)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The generation ended: ``length`` and ``content_filter`` make the response incomplete."""

    finish_reason: FinishReason
    usage: ResponseUsage


@dataclass(frozen=True)
class Failed:
    """The generation failed: the response fails with this error (no internal text in it)."""

    message: str
    code: str = "server_error"
    usage: ResponseUsage | None = None


GenerationDelta = TextDelta | ToolCallStart | ToolCallDelta | Done | Failed
_ENDINGS: dict[str, tuple[Literal["completed", "incomplete"], str | None]] = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


class ResponseBuilder:
    """OpenAI's events for one response, from its generation's deltas.

    :meth:`start` opens the stream (``response.created``, ``response.in_progress``; a
    background response calls :meth:`queue` first), :meth:`feed` answers each delta with the
    events it makes, and after :class:`Done` or :class:`Failed` the builder is
    :attr:`finished`. :attr:`response` is always what the last event reported; events carry
    copies, so later deltas do not change what was sent.
    """

    def __init__(
        self,
        request: CreateResponseRequest,
        *,
        response_id: str | None = None,
        model: str | None = None,
        created_at: int | None = None,
    ) -> None:
        """``model``: the served model's name, if not the one the request named;
        ``response_id`` and ``created_at`` where the route made them (a stored response's)."""
        self.request = request
        given = {"id": response_id, "model": model, "created_at": created_at}
        self.response = Response.of(request, **{k: v for k, v in given.items() if v is not None})
        self.finished = False
        self._sequence = 0
        self._created = False
        self._open: OutputItem | None = None
        self._text_logprobs: list[DeltaLogProb] = []

    def queue(self) -> list[Event]:
        """A background response, waiting: ``response.created`` and ``response.queued``."""
        self.response.status = "queued"
        self._created = True
        return [self._lifecycle("response.created"), self._lifecycle("response.queued")]

    def start(self) -> list[Event]:
        """``response.created`` (unless queued before) and ``response.in_progress``."""
        self.response.status = "in_progress"
        created = [] if self._created else [self._lifecycle("response.created")]
        self._created = True
        return [*created, self._lifecycle("response.in_progress")]

    def feed(self, delta: GenerationDelta) -> list[Event]:
        if self.finished:
            raise ValueError("the response is finished: nothing more can be fed to it")
        if isinstance(delta, TextDelta):
            return self._text(delta)
        if isinstance(delta, ToolCallStart):
            return self._close("completed") + self._start_call(delta)
        if isinstance(delta, ToolCallDelta):
            return self._call_delta(delta)
        if isinstance(delta, Done):
            return self._done(delta)
        return self._failed(delta)

    def error(self, message: str, code: str | None = None, param: str | None = None) -> ErrorEvent:
        """OpenAI's `error` event, for a failure outside the response (it ends the stream)."""
        return ErrorEvent(sequence_number=self._next(), code=code, message=message, param=param)

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    @property
    def _index(self) -> int:
        return len(self.response.output) - 1

    def _lifecycle(self, kind: str) -> LifecycleEvent:
        snapshot = self.response.model_copy(deep=True)
        return LifecycleEvent.model_validate(
            {"type": kind, "sequence_number": self._next(), "response": snapshot}
        )

    def _item_event(self, kind: str, item: OutputItem) -> OutputItemEvent:
        snapshot = item.model_copy(deep=True)
        return OutputItemEvent.model_validate(
            {
                "type": kind,
                "sequence_number": self._next(),
                "output_index": self._index,
                "item": snapshot,
            }
        )

    def _part_event(self, kind: str, message: OutputMessage) -> ContentPartEvent:
        return ContentPartEvent.model_validate(
            {
                "type": kind,
                "sequence_number": self._next(),
                "item_id": message.id,
                "output_index": self._index,
                "content_index": 0,
                "part": message.content[0].model_copy(deep=True),
            }
        )

    def _open_message(self) -> list[Event]:
        message = OutputMessage()
        self.response.output.append(message)
        self._open = message
        added = self._item_event("response.output_item.added", message)
        message.content.append(OutputText())
        return [added, self._part_event("response.content_part.added", message)]

    def _text(self, delta: TextDelta) -> list[Event]:
        events: list[Event] = []
        if not isinstance(self._open, OutputMessage):
            events += self._close("completed") + self._open_message()
        message = self._open
        assert isinstance(message, OutputMessage)
        part = message.content[0]
        part.text += delta.text
        logprobs = [DeltaLogProb.of(t) for t in delta.logprobs] if self.request.logprobs else []
        if self.request.logprobs:
            part.logprobs += [LogProb.of(t) for t in delta.logprobs]
            self._text_logprobs += logprobs
        if delta.text or logprobs:
            events.append(
                TextDeltaEvent(
                    sequence_number=self._next(),
                    item_id=message.id,
                    output_index=self._index,
                    content_index=0,
                    delta=delta.text,
                    logprobs=logprobs,
                )
            )
        return events

    def _start_call(self, start: ToolCallStart) -> list[Event]:
        tool = self.request.tool(start.name)
        kind = start.kind or (tool.kind if tool else "function")
        name, namespace = (tool.name, tool.namespace) if tool else (start.name, None)
        call_id = start.call_id or new_call_id()
        item: OutputItem
        if kind == "custom":
            item = CustomToolCallItem(name=name, namespace=namespace, call_id=call_id)
        else:
            item = FunctionCallItem(name=name, namespace=namespace, call_id=call_id)
        self.response.output.append(item)
        self._open = item
        return [self._item_event("response.output_item.added", item)]

    def _call_delta(self, delta: ToolCallDelta) -> list[Event]:
        item = self._open
        if isinstance(item, FunctionCallItem):
            item.arguments += delta.text
            kind = "response.function_call_arguments.delta"
        elif isinstance(item, CustomToolCallItem):
            item.input += delta.text
            kind = "response.custom_tool_call_input.delta"
        else:
            raise ValueError("a ToolCallDelta needs a ToolCallStart before it")
        return [
            CallDeltaEvent.model_validate(
                {
                    "type": kind,
                    "sequence_number": self._next(),
                    "item_id": item.id,
                    "output_index": self._index,
                    "delta": delta.text,
                }
            )
        ]

    def _close(self, status: Literal["completed", "incomplete"]) -> list[Event]:
        """The open item's closing events, with ``status``; none when no item is open."""
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        seq = self._next
        events: list[Event]
        if isinstance(item, OutputMessage):
            text, logprobs = item.content[0].text, self._text_logprobs
            self._text_logprobs = []
            done = TextDoneEvent(
                sequence_number=seq(),
                item_id=item.id,
                output_index=self._index,
                content_index=0,
                text=text,
                logprobs=logprobs,
            )
            events = [done, self._part_event("response.content_part.done", item)]
        elif isinstance(item, FunctionCallItem):
            events = [
                ArgumentsDoneEvent(
                    sequence_number=seq(),
                    item_id=item.id,
                    output_index=self._index,
                    name=item.name,
                    arguments=item.arguments,
                )
            ]
        else:
            events = [
                InputDoneEvent(
                    sequence_number=seq(),
                    item_id=item.id,
                    output_index=self._index,
                    input=item.input,
                )
            ]
        return [*events, self._item_event("response.output_item.done", item)]

    def _done(self, done: Done) -> list[Event]:
        status, reason = _ENDINGS[done.finish_reason]
        events: list[Event] = []
        if not self.response.output:  # an empty answer is still a message, as OpenAI's
            events += self._open_message()
        events += self._close(status)
        self.response.status = status
        self.response.usage = done.usage
        if reason is not None:
            self.response.incomplete_details = IncompleteDetails.model_validate({"reason": reason})
        else:
            self.response.completed_at = int(time.time())
        self.finished = True
        return [*events, self._lifecycle(f"response.{status}")]

    def _failed(self, failed: Failed) -> list[Event]:
        events = self._close("incomplete")
        self.response.status = "failed"
        self.response.error = ResponseError(code=failed.code, message=failed.message)
        self.response.usage = failed.usage
        self.finished = True
        return [*events, self._lifecycle("response.failed")]


def response_events(builder: ResponseBuilder, deltas: Iterable[GenerationDelta]) -> Iterator[Event]:
    """Every event of a response, from its start to its end (a synchronous source's)."""
    yield from builder.start()
    for delta in deltas:
        yield from builder.feed(delta)


def build_response(
    request: CreateResponseRequest,
    deltas: Iterable[GenerationDelta],
    *,
    response_id: str | None = None,
    model: str | None = None,
    created_at: int | None = None,
) -> Response:
    """The finished Response of ``deltas`` (the JSON answer): the stream builder's, so it is
    exactly what a stream's last event carries."""
    builder = ResponseBuilder(request, response_id=response_id, model=model, created_at=created_at)
    for _ in response_events(builder, deltas):
        pass
    return builder.response
