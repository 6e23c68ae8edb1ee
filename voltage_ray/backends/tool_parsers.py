"""Tool calls read out of a choice's text, whole or as it streams.

In the shape of vLLM's tool parsers: a parser is a small class, one per choice, with one method
for a whole answer (:meth:`ToolParser.parse`) and one for a stream's text deltas
(:meth:`ToolParser.push`, then :meth:`ToolParser.finish`), both producing the same calls. Stream
deltas follow OpenAI: a call's ``index``, ``id`` and name first, then fragments of its arguments'
JSON text, which concatenate to the call's ``arguments``.

- ``hermes`` (registered, chosen per model with ``chat.tool_parser``): ``tool_choice: auto``,
  the model's own ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen2.5,
  SmolLM2, Hermes); text outside them is the message's content.
- :class:`RequiredParser` and :class:`NamedParser` read what the constraint of ``tool_choice:
  required`` and of a named function produce (``deployments/asks.constraint_of``): a JSON array of
  ``{"name", "parameters"}`` objects, and the named function's arguments object.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import ClassVar

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ID_CHARS = string.ascii_letters + string.digits


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class CallDelta:
    """A piece of one tool call: its id and name when it starts, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    """What some text produced: content for the message, and pieces of tool calls."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls += other.calls
        return self


@dataclass
class Call:
    id: str
    name: str
    arguments: str


class _CallBody:
    """One call's JSON object as it grows: the name once complete, then the arguments value's
    text as it arrives (up to the value's end)."""

    def __init__(self, index: int, args_key: str) -> None:
        self.index = index
        self.call = Call(call_id(), "", "")
        self._args = re.compile(rf'"{args_key}"\s*:\s*')
        self._body = ""
        self._named = False
        self._start: int | None = None
        self._done = False

    def feed(self, text: str) -> list[CallDelta]:
        self._body += text
        out: list[CallDelta] = []
        if not self._named:
            m = _NAME.search(self._body)
            if m is None:
                return out
            self._named = True
            self.call.name = json.loads(f'"{m.group(1)}"')
            out.append(CallDelta(self.index, self.call.id, self.call.name))
        if self._start is None:
            m = self._args.search(self._body)
            if m is None or m.end() == len(self._body):  # the value has not begun yet
                return out
            self._start = m.end()
        if not self._done:
            end = value_end(self._body, self._start)
            self._done = end is not None
            value = self._body[self._start : end] if end is not None else self._body[self._start :]
            # An unfinished value keeps its trailing blanks back: they may end it.
            fresh = (value if end is not None else value.rstrip())[len(self.call.arguments) :]
            if fresh:
                self.call.arguments += fresh
                out.append(CallDelta(self.index, arguments=fresh))
        return out

    @property
    def valid(self) -> bool:
        """A named call whose arguments are a whole JSON object."""
        try:
            return bool(self.call.name) and isinstance(json.loads(self.call.arguments), dict)
        except ValueError:
            return False


def value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at ``text[start:]`` (after blanks) ends, or None while it
    is incomplete."""
    i = start
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    if i >= len(text):
        return None
    if text[i] not in '{["':
        m = re.compile(r"[^,}\]\s]*").match(text, i)
        end = m.end() if m else i
        return end if end < len(text) else None
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


class ToolParser:
    """Base: a parser for one choice. ``parse`` reads a whole answer; ``push`` and ``finish``
    read a stream; both give the same calls."""

    name: ClassVar[str] = ""
    # The text is a call by construction (the constraint of ``required`` or a named function):
    # only ``max_tokens`` can cut it short, and then the call stays a call with the arguments
    # written so far, as OpenAI returns it (``finish_reason: length``) and as a stream sends it.
    forced: ClassVar[bool] = False

    def __init__(self) -> None:
        self.bodies: list[_CallBody] = []

    def push(self, text: str) -> Parsed:
        raise NotImplementedError

    def finish(self) -> Parsed:
        """The text held back at the end of the stream."""
        return Parsed()

    @property
    def calls(self) -> list[Call]:
        return [b.call for b in self.bodies if b.call.name]

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """Content and calls of a whole answer. In the model's own format, a call that is not a
        named function with a JSON object as arguments leaves the whole answer as content, with
        no calls (as vLLM does); a forced call cut short stays a call (:attr:`forced`)."""
        parsed = self.push(text).add(self.finish())
        if not self.forced and self.bodies and not all(b.valid for b in self.bodies):
            return text, []
        return parsed.content, self.calls


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._inside = False

    def push(self, text: str) -> Parsed:
        out = Parsed()
        buffer = self._held + text
        self._held = ""
        while buffer:
            tag = self.END if self._inside else self.START
            pos = buffer.find(tag)
            if pos == -1:
                keep = _partial_suffix(buffer, tag)
                piece, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
                self._emit(piece, out)
                break
            self._emit(buffer[:pos], out)
            buffer = buffer[pos + len(tag) :]
            if not self._inside:
                self.bodies.append(_CallBody(len(self.bodies), "arguments"))
            self._inside = not self._inside
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        held, self._held = self._held, ""
        self._emit(held, out)
        return out

    def _emit(self, piece: str, out: Parsed) -> None:
        if not piece:
            return
        if self._inside:
            out.calls += self.bodies[-1].feed(piece)
        elif not self.bodies or piece.strip():  # blanks between calls are dropped
            out.content += piece


class RequiredParser(ToolParser):
    """``tool_choice: required``: a JSON array of ``{"name", "parameters"}`` objects."""

    forced = True

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._in_string = self._escaped = False

    def push(self, text: str) -> Parsed:
        out = Parsed()
        start = 0
        for j, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
                if self._depth == 2 and ch == "{":  # a call object starts
                    self.bodies.append(_CallBody(len(self.bodies), "parameters"))
                    start = j
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 1 and self.bodies:  # the call object ends
                    out.calls += self.bodies[-1].feed(text[start : j + 1])
                    start = j + 1
        if self._depth >= 2 and self.bodies:
            out.calls += self.bodies[-1].feed(text[start:])
        return out


class NamedParser(ToolParser):
    """A named function: the whole text is its arguments."""

    forced = True

    def __init__(self, function: str) -> None:
        super().__init__()
        body = _CallBody(0, "arguments")
        body.call.name = function
        self.bodies.append(body)
        self._started = False

    def push(self, text: str) -> Parsed:
        out = Parsed()
        call = self.bodies[0].call
        if not self._started:
            self._started = True
            out.calls.append(CallDelta(0, call.id, call.name))
        if text:
            call.arguments += text
            out.calls.append(CallDelta(0, arguments=text))
        return out


PARSERS: dict[str, type[ToolParser]] = {HermesParser.name: HermesParser}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
