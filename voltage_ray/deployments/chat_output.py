"""One choice's output in OpenAI's shape: text or tool calls, logprobs, the finish reason.

The engines produce text and token logprobs per choice (:class:`StepEvent`); this turns them into
a whole :class:`Choice` or into stream deltas, reading tool calls with the request's parser
(``backends/tool_parsers.py``): the model's own format for ``tool_choice: auto``, the constrained
JSON for ``required`` and a named function. A choice that made calls finishes with
``tool_calls``; its content is what the model wrote outside them (null when nothing).
"""

from __future__ import annotations

from collections.abc import Callable

from voltage_ray.backends.chat import StepEvent, TokenLogprobs
from voltage_ray.backends.tool_parsers import (
    PARSERS,
    Call,
    CallDelta,
    NamedParser,
    RequiredParser,
    ToolParser,
)
from voltage_ray.protocol.chat import (
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionDelta,
    ResponseMessage,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)
from voltage_ray.protocol.tools import FunctionCallOut, ToolCallOut

TokenBytes = Callable[[int], bytes]


def tool_parser(request: ChatCompletionRequest, parser: str) -> ToolParser | None:
    """The parser of one choice of ``request`` (``parser``: the model's configured name)."""
    mode = request.tool_mode
    if mode == "auto":
        return PARSERS[parser]()
    if mode == "required":
        return RequiredParser()
    if mode == "named":
        return NamedParser(request.forced_tools[0].function.name)
    return None


def openai_logprobs(items: list[TokenLogprobs], token_bytes: TokenBytes) -> list[TokenLogprob]:
    def entry(token: int) -> tuple[str, list[int]]:
        raw = token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    out = []
    for item in items:
        text, raw = entry(item.token)
        top = []
        for token, logprob in item.top:
            t, b = entry(token)
            top.append(TopLogprob(token=t, logprob=logprob, bytes=b))
        out.append(TokenLogprob(token=text, logprob=item.logprob, bytes=raw, top_logprobs=top))
    return out


class ChoiceOutput:
    """Collects one choice's events, for a whole answer (:meth:`add`, :meth:`choice`) or a
    stream (:meth:`deltas`)."""

    def __init__(
        self,
        index: int,
        parser: ToolParser | None,
        token_bytes: TokenBytes,
        logprobs: bool,
    ) -> None:
        self.index = index
        self.parser = parser
        self.token_bytes = token_bytes
        self.logprobs = logprobs
        self.text = ""
        self.scored: list[TokenLogprobs] = []
        self.finish_reason: str | None = None

    # --- a whole answer ------------------------------------------------------------------------

    def add(self, ev: StepEvent) -> None:
        self.text += ev.text
        self.scored += ev.logprobs
        self.finish_reason = ev.finish_reason or self.finish_reason

    def choice(self) -> Choice:
        content: str | None = self.text
        calls: list[ToolCallOut] | None = None
        if self.parser is not None:
            content, found = self.parser.parse(self.text)
            if found:
                calls = [_call_out(c) for c in found]
                content = content.strip() or None
        message = ResponseMessage(content=content, tool_calls=calls)
        return Choice(
            index=self.index,
            message=message,
            finish_reason=self._reason(bool(calls)),  # type: ignore[arg-type]
            logprobs=self._logprobs(self.scored),
        )

    # --- a stream ------------------------------------------------------------------------------

    def deltas(self, ev: StepEvent) -> list[ChunkChoice]:
        """The chunk choices one event gives: content or tool call pieces (logprobs ride on the
        first), then the finish."""
        self.scored += ev.logprobs
        pieces: list[Delta] = []
        if self.parser is None:
            if ev.text:
                pieces.append(Delta(content=ev.text))
        else:
            parsed = self.parser.push(ev.text)
            if ev.finish_reason is not None:
                parsed.add(self.parser.finish())
            if parsed.content:
                pieces.append(Delta(content=parsed.content))
            pieces += [Delta(tool_calls=[_tool_delta(d)]) for d in parsed.calls]
        out = [ChunkChoice(index=self.index, delta=d) for d in pieces]
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            made_calls = self.parser is not None and bool(self.parser.calls)
            reason = self._reason(made_calls)
            out.append(ChunkChoice(index=self.index, delta=Delta(), finish_reason=reason))  # type: ignore[arg-type]
        if self.scored and out:
            out[0].logprobs = self._logprobs(self.scored)
            self.scored = []
        return out

    def _reason(self, made_calls: bool) -> str | None:
        return "tool_calls" if made_calls and self.finish_reason == "stop" else self.finish_reason

    def _logprobs(self, items: list[TokenLogprobs]) -> ChoiceLogprobs | None:
        if not self.logprobs:
            return None
        return ChoiceLogprobs(content=openai_logprobs(items, self.token_bytes))


def _tool_delta(d: CallDelta) -> ToolCallDelta:
    if d.id is not None:  # a call starts: its id, type and name (arguments follow)
        return ToolCallDelta(
            index=d.index,
            id=d.id,
            type="function",
            function=FunctionDelta(name=d.name, arguments=d.arguments),
        )
    return ToolCallDelta(index=d.index, function=FunctionDelta(arguments=d.arguments))


def _call_out(call: Call) -> ToolCallOut:
    function = FunctionCallOut(name=call.name, arguments=call.arguments)
    return ToolCallOut(id=call.id, function=function)
