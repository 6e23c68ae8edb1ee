"""Answers kept by ``Idempotency-Key``, so that a request sent again is answered and billed once.

A client that lost an answer (its connection cut, the ingress that served it killed with its
node) cannot know whether it was billed; the OpenAI SDK simply sends the request again. A request
carrying an ``Idempotency-Key`` header is recognized when it comes again with the same key from
the same API key (the IETF httpapi draft's semantics, as Stripe's API does it):

- its first attempt still running: the repeat waits for it, then takes its answer (or, if that
  attempt's ingress died before answering, runs afresh);
- its first attempt answered (200): the repeat gets the same bytes again, with
  ``Idempotent-Replayed: true``, billed nothing and not counted as a request;
- a different request body or endpoint under the same key: 400;
- an attempt that failed, or whose client left before the end: forgotten (a repeat runs afresh).

The store lives in the limiter actor (every ingress replica sees it, and it outlives any of
them), in memory, bounded by bytes and age; answers over a sixteenth of the store are not kept.
Pure bookkeeping, no clock of its own: ``now`` is passed in.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from dataclasses import dataclass, field

MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class Answer:
    """A response as it left the ingress: status, headers and every body byte."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Replay:
    """Admission's result for a repeat of an answered request: its answer, billed nothing."""

    answer: Answer


class Replayed(Exception):
    """Raised by an ingress admission that got a kept answer: the app sends it as it was."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("replayed")
        self.answer = answer


@dataclass(frozen=True)
class InProgress:
    """Admission's result for a repeat of a request still running: wait, then ask again."""


@dataclass
class Entry:
    fingerprint: str  # of the request (endpoint and body): a different one under the key is a 400
    ticket: Hashable | None  # the attempt running (its hold), None once answered
    answer: Answer | None = None
    expires: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)


Ident = tuple[str, str]  # API key id, Idempotency-Key


def store_bytes(max_mb: float) -> int:
    """The bytes of answers a store of ``max_mb`` keeps."""
    return int(max_mb * 2**20)


def max_answer_bytes(max_mb: float) -> int:
    """The largest answer a store of ``max_mb`` keeps (the ingress stops copying past it)."""
    return store_bytes(max_mb) // 16


class Answers:
    """Entries by (API key id, Idempotency-Key): attempts running and answers kept."""

    def __init__(self, ttl_s: float, max_mb: float) -> None:
        self.bytes = 0
        self.configure(ttl_s, max_mb)
        self.entries: collections.OrderedDict[Ident, Entry] = collections.OrderedDict()
        self.running: dict[Hashable, Ident] = {}  # the running attempt's hold -> its entry
        self.replayed = 0

    def __len__(self) -> int:
        return len(self.entries)

    def configure(self, ttl_s: float, max_mb: float) -> None:
        """Age and size bounds (answers already kept stay until these push them out)."""
        self.ttl_s = ttl_s
        self.max_bytes = store_bytes(max_mb)
        self.max_answer_bytes = max_answer_bytes(max_mb)

    def find(self, ident: Ident, now: float) -> Entry | None:
        entry = self.entries.get(ident)
        if entry is not None and entry.ticket is None and entry.expires <= now:
            self._drop(ident)
            return None
        return entry

    def begin(self, ident: Ident, fingerprint: str, ticket: Hashable) -> None:
        """An admitted first attempt."""
        self.entries[ident] = Entry(fingerprint, ticket)
        self.running[ticket] = ident

    def finish(self, ticket: Hashable, answer: Answer | None, now: float) -> None:
        """The attempt ``ticket`` ended: keep its answer (a 200 small enough), else forget it.
        Whoever waits on it asks again."""
        ident = self.running.pop(ticket, None)
        if ident is None:
            return
        entry = self.entries[ident]
        entry.done.set()
        if answer is None or answer.status != 200 or len(answer.body) > self.max_answer_bytes:
            del self.entries[ident]
            return
        entry.ticket, entry.answer, entry.expires = None, answer, now + self.ttl_s
        self.entries.move_to_end(ident)
        self.bytes += len(answer.body)
        while self.bytes > self.max_bytes:  # the oldest answers go first
            oldest = next(i for i, e in self.entries.items() if e.answer is not None)
            self._drop(oldest)

    def expire(self, now: float) -> None:
        """Forget the answers past their age (kept in the order they were answered)."""
        for ident, entry in list(self.entries.items()):
            if entry.answer is not None and entry.expires <= now:
                self._drop(ident)

    def _drop(self, ident: Ident) -> None:
        entry = self.entries.pop(ident)
        if entry.answer is not None:
            self.bytes -= len(entry.answer.body)
        if entry.ticket is not None:
            self.running.pop(entry.ticket, None)
            entry.done.set()


def valid_key(value: str) -> bool:
    """1 to 255 visible ASCII characters (a UUID is the usual choice)."""
    return 0 < len(value) <= MAX_KEY_CHARS and all(33 <= ord(c) <= 126 for c in value)
