"""Legacy text completions in OpenAI's shape: one choice's text and ``logprobs`` (parallel lists
of tokens, their logprobs, the top alternatives and text offsets), and the merge of several
prompts' event streams.

With ``echo``, a choice starts with its prompt: the prompt's text and, when logprobs are asked,
its tokens as the model scored them (the first token has no logprob, OpenAI's ``null``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from voltage_ray.backends.chat import PromptScored, StepEvent, TokenLogprobs
from voltage_ray.protocol.completions import CompletionChoice, CompletionLogprobs

TokenText = Callable[[int], str]


class CompletionOutput:
    """One choice: whole (:meth:`echo`, :meth:`add` ..., then :meth:`choice`) or streamed (the
    :class:`CompletionChoice` each of those returns is a chunk's piece)."""

    def __init__(self, index: int, token_text: TokenText, logprobs: bool) -> None:
        self.index = index
        self.token_text = token_text
        self.scoring = logprobs
        self.text = ""
        self.finish_reason: str | None = None
        # (token text, logprob, top alternatives, text offset) of each token reported
        self.scored: list[tuple[str, float | None, dict[str, float] | None, int]] = []
        self.sent = 0  # entries of ``scored`` already in a chunk
        self.offset = 0  # characters of the tokens reported so far

    def echo(self, text: str, scored: PromptScored | None) -> CompletionChoice:
        """The prompt, as the choice's first text (and logprobs)."""
        if scored is not None:
            for token, item in zip(scored.tokens, scored.logprobs, strict=True):
                self._score(token, item)
        return self._add(text, None)

    def add(self, ev: StepEvent) -> CompletionChoice:
        """One event's text and logprobs."""
        for item in ev.logprobs:
            self._score(item.token, item)
        return self._add(ev.text, ev.finish_reason)

    def choice(self) -> CompletionChoice:
        """The whole choice."""
        return CompletionChoice(
            text=self.text,
            index=self.index,
            logprobs=self._logprobs(0),
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
        )

    def _add(self, text: str, reason: str | None) -> CompletionChoice:
        self.text += text
        self.finish_reason = reason or self.finish_reason
        delta = CompletionChoice(
            text=text,
            index=self.index,
            logprobs=self._logprobs(self.sent),
            finish_reason=reason,  # type: ignore[arg-type]
        )
        self.sent = len(self.scored)
        return delta

    def _logprobs(self, start: int) -> CompletionLogprobs | None:
        if not self.scoring:
            return None
        entries = self.scored[start:]
        return CompletionLogprobs(
            tokens=[e[0] for e in entries],
            token_logprobs=[e[1] for e in entries],
            top_logprobs=[e[2] for e in entries],
            text_offset=[e[3] for e in entries],
        )

    def _score(self, token: int, item: TokenLogprobs | None) -> None:
        text = self.token_text(token)
        if item is None:  # the prompt's first token: nothing before it to score it
            self.scored.append((text, None, None, self.offset))
        else:
            # OpenAI: the `logprobs` most likely tokens and the chosen one (up to logprobs + 1)
            top = {self.token_text(t): v for t, v in item.top}
            top.setdefault(text, item.logprob)
            self.scored.append((text, item.logprob, top, self.offset))
        self.offset += len(text)


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, with the index of their iterator. An
    error in one ends all; leaving early (or being cancelled) closes every one (a generation
    then stops in its engine)."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item, None, False))
        except Exception as exc:
            queue.put_nowait((i, None, exc, True))
        else:
            queue.put_nowait((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item, error, ended = await queue.get()
            if error is not None:
                raise error
            if ended:
                left -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
