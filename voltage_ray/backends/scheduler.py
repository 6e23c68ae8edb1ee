"""Iteration-level (continuous) batching, engine-neutral: one scheduler thread per replica.

A :class:`Scheduler` owns a model's forward passes. Requests are submitted from any thread as
:class:`Prepared` prompts with their :class:`Tenant`; each iteration the engine's subclass admits
waiting requests (fairly between API keys, within free rows and the ``max_prefill_tokens``
budget, so a long prompt is prefilled in chunks and never stalls running streams for more than a
chunk), runs its forward pass, and hands
the logits to :meth:`Scheduler._advance`, which samples one token per row with the shared sampler
(``backends/sampler.py``), turns tokens into text with each row's :class:`RowDecoder`, and sends
the step's events. A row leaves the batch the step it finishes or the step after its caller
cancels; a request's ``n`` choices share one prefill.

Fairness between keys (``backends/fairness.py``): waiting requests and paused rows are taken
highest priority first, then from the key holding the fewest rows; ``max_queued`` bounds the
requests waiting, and a key under its share displaces one of a key over it. When every row is
taken, a request under its share may take one of ``headroom_rows`` extra rows, and past those
a running row of the key holding the most (or of a lower priority) is paused: the engine sets its
KV cache aside (llama.cpp: a copy of its slot's cells; transformers: its rows of the cache) and
resumes it later exactly where it was, with the same sampler state, so its text is the one it
would have produced (tested).

Two engines implement the forward side: transformers (``backends/batching.py``: a padded batch
over one ``DynamicCache``) and llama.cpp (``backends/llama_cpp_engine.py``: a KV slot per row,
prefill chunks in the same llama.cpp batch as decode tokens, as llama-server does).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from voltage_ray.backends.chat import (
    Finished,
    Prepared,
    PromptScored,
    RowDecoder,
    StepEvent,
    TokenLogprobs,
)
from voltage_ray.backends.fairness import ANONYMOUS, Served, Tenant, first, give_way, victim
from voltage_ray.backends.fairness import under_share as fair_share
from voltage_ray.backends.grammar import Grammars
from voltage_ray.backends.sampler import RowSampling, row_sampling, sample
from voltage_ray.errors import BadRequest, Overloaded

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Sink = Callable[[Any], object]  # receives list[StepEvent], then Finished, or an exception


@dataclass(eq=False)
class Ticket:
    """A submitted request: the caller's handle to cancel it."""

    prepared: Prepared
    sink: Sink
    tenant: Tenant = ANONYMOUS
    seq: int = 0  # order of submission
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancel_step: int = 0  # the scheduler's step count when it was cancelled
    live_rows: int = 0
    used: list[int] = field(default_factory=list)  # tokens of each choice, filled as rows end
    cached: int = 0  # prompt tokens found in the prefix cache
    retired: bool = False  # finished, failed, shed or cancelled: its place is free


@dataclass(eq=False)
class Row:
    """One choice decoding: its text and termination, its sampling state, and what the engine
    keeps for it (the next token to feed; llama.cpp: its KV slot and length)."""

    ticket: Ticket
    index: int  # choice index
    decoder: RowDecoder
    sampling: RowSampling
    last: int = 0  # the token to feed at the next decode step
    slot: int = -1
    length: int = 0  # tokens in its KV cache
    fed: list[int] = field(default_factory=list)  # llama.cpp: generated tokens in its KV cache
    saved: Any = None  # while paused: the engine's copy of its KV cache

    @property
    def tenant(self) -> Tenant:
        return self.ticket.tenant

    @property
    def seq(self) -> int:
        return self.ticket.seq


class Scheduler:
    """The engine-neutral part: submit requests from any thread, get step events back.

    ``decode`` turns token ids into text for the row decoders. Events reach each request's
    ``sink`` on the scheduler thread, so sinks must only hand them over (e.g.
    ``loop.call_soon_threadsafe``). Subclasses implement :meth:`_iteration`, :meth:`_rows_running`
    and :meth:`_held` (the tickets they hold, for failures), and for fairness :meth:`_running`,
    :meth:`_prefilling_tickets`, :meth:`_pause` and :meth:`_resume`.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        device: torch.device | str = "cpu",
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, Tenant], None] | None = None,
        grammars: Grammars | None = None,
        max_queued: int | None = None,
        headroom_rows: int = 0,
    ) -> None:
        self.decode = decode
        self.eos_ids = eos_ids
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.device = device
        self.on_step = on_step
        self.on_admit = on_admit  # hears how long each admitted request waited for a row
        self.grammars = grammars  # compiles (cached) the constraints of constrained rows
        self.max_queued = max_queued  # requests waiting at most (None: unbounded)
        self.headroom_rows = headroom_rows  # rows past max_num_seqs for keys under their share
        self.waiting: list[Ticket] = []  # taken in fair order, not arrival order
        self.paused: list[Row] = []
        self.places: collections.Counter[str] = collections.Counter()  # live tickets per key
        self.served = Served()  # tokens per key lately (scheduler thread only)
        self.preemptions = self.resumptions = self.shed = self.refused = 0
        self._seq = itertools.count()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.steps = self.prefill_chunks = self.cancelled = 0
        self.max_prefill_chunk = 0  # most prompt tokens in one prefill forward
        self.max_eviction_lag = 0  # most decode steps between a cancel and its rows' eviction
        # Seconds of the scheduler thread: in steps, and of those in the model's forward calls
        # (the rest is scheduling, sampling, detokenizing, and waits for the GIL). On a GPU a
        # forward call returns once its kernels are queued; the sampler's copy waits for them.
        self.busy_s = self.forward_s = 0.0
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chat-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- called from other threads -------------------------------------------------------------

    def submit(self, prepared: Prepared, sink: Sink, tenant: Tenant = ANONYMOUS) -> Ticket:
        """Queue a request; :class:`Overloaded` when the queue is full and ``tenant`` holds its
        share (a waiting request of a key over its share may be shed for it instead)."""
        ticket = Ticket(prepared, sink, tenant, next(self._seq))
        with self._wake:
            shed = self._make_room(tenant)
            self.waiting.append(ticket)
            self.places[tenant.key] += 1
            self._wake.notify()
        if shed is not None:
            shed.sink(Overloaded(details={"reason": "shed"}))
        return ticket

    def _make_room(self, tenant: Tenant) -> Ticket | None:
        """With the lock held: None when the newcomer may wait, the request it displaces, or
        :class:`Overloaded` (``backends/fairness.py``: :func:`give_way`)."""
        if self.max_queued is None or len(self.waiting) < self.max_queued:
            return None
        capacity = self.max_num_seqs + self.max_queued
        waiting = [(t.tenant, t.seq) for t in self.waiting]
        i = give_way(waiting, self.places, tenant, capacity)
        if i is None:
            self.refused += 1
            raise Overloaded(details={"reason": "refused"})
        if i < 0:
            return None
        shed = self.waiting.pop(i)
        self.shed += 1
        self._retire(shed)
        return shed

    def cancel(self, ticket: Ticket) -> None:
        """Evict ``ticket``'s rows before the next decode step (safe from any thread)."""
        ticket.cancel_step = self.steps
        ticket.cancelled = True
        with self._wake:
            self._wake.notify()  # a waiting or paused request holds no row: drop it now

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Rows decoding, requests waiting (prefilling included) and realized batch sizes."""
        running, prefilling = self._rows_running(), self._prefilling()
        return {
            "running": running,
            "waiting": len(self.waiting) + prefilling,
            "paused": len(self.paused),
            "preemptions": self.preemptions,
            "resumptions": self.resumptions,
            "shed": self.shed,
            "refused": self.refused,
            "steps": self.steps,
            "prefill_chunks": self.prefill_chunks,
            "batch_sizes": dict(sorted(dict(self.batch_sizes).items())),  # copied under the GIL
            "evicted_cancelled": self.cancelled,
            "max_eviction_lag_steps": self.max_eviction_lag,
            "max_prefill_chunk_tokens": self.max_prefill_chunk,
            "max_num_seqs": self.max_num_seqs,
            "headroom_rows": self.headroom_rows,
            "max_queued": self.max_queued,
            "max_prefill_tokens": self.max_prefill_tokens,
            "busy_s": round(self.busy_s, 3),
            "forward_s": round(self.forward_s, 3),
        }

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after its current step. Joined, so no model op is still running in it
        when the interpreter exits (that aborts the process)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout_s)

    # --- for subclasses (scheduler thread) ----------------------------------------------------

    def _iteration(self) -> None:
        raise NotImplementedError

    def _rows_running(self) -> int:
        raise NotImplementedError

    def _prefilling(self) -> int:
        """Requests admitted but still prefilling."""
        return 0

    def _held(self) -> list[Ticket]:
        """Every ticket the engine holds (running or prefilling), to fail them on an error."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop every running row and prefill after an error (their tickets were failed)."""
        raise NotImplementedError

    def _running(self) -> list[Row]:
        """Rows decoding now (what a preemption may pause)."""
        raise NotImplementedError

    def _prefilling_tickets(self) -> list[Ticket]:
        """Requests whose prompts are being prefilled (their rows are taken)."""
        return []

    def _pause(self, row: Row) -> None:
        """Take ``row`` out of the batch, its KV cache set aside in ``row.saved``."""
        raise NotImplementedError

    def _resume(self, row: Row) -> bool:
        """Put a paused row back into the batch from ``row.saved``; False if it cannot now."""
        raise NotImplementedError

    def _idle(self) -> bool:
        return not self.waiting and not self.paused and not self._held()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and self._idle():
                    self._wake.wait()
                if self._stop:
                    return
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a failed forward fails the requests it held, not the loop
                logger.exception("chat scheduler step failed")
                tickets = self._held()
                self._forget()
                for t in set(tickets):
                    t.sink(exc)
                    self._retire(t)
            finally:
                self.busy_s += time.perf_counter() - start

    def _forward(self, call: Callable[[], _T]) -> _T:
        """``call()``, a forward pass of the model, timed into ``forward_s``."""
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.forward_s += time.perf_counter() - start

    def _retire(self, ticket: Ticket) -> None:
        """A request left the engine (finished, failed, shed or cancelled): its place is free."""
        with self._wake:
            if ticket.retired:
                return
            ticket.retired = True
            key = ticket.tenant.key
            self.places[key] -= 1
            if self.places[key] <= 0:
                del self.places[key]

    def _drop_cancelled_waiting(self) -> None:
        """Forget waiting requests and paused rows whose callers left."""
        with self._wake:
            gone = [t for t in self.waiting if t.cancelled]
            self.waiting = [t for t in self.waiting if not t.cancelled]
            dropped = {r.ticket for r in self.paused if r.ticket.cancelled}
            self.paused = [r for r in self.paused if not r.ticket.cancelled]
            self.served.forget(self.places)
        self.cancelled += len(gone)
        self._note_cancelled(dropped)
        for t in gone:
            self._retire(t)

    def _note_cancelled(self, tickets: set[Ticket]) -> None:
        """Rows of cancelled requests left the engine: count them, free their places."""
        self.cancelled += len(tickets)
        if tickets:
            lag = max(self.steps - t.cancel_step for t in tickets)
            self.max_eviction_lag = max(self.max_eviction_lag, lag)
        for t in tickets:
            self._retire(t)

    def _take(self, fits: Callable[[list[Ticket], Ticket], bool]) -> list[Ticket]:
        """Waiting requests to start now, in fair order (``backends/fairness.py``), while rows
        are free and ``fits(chosen, next)`` (the engine's own limits, e.g. a prefill budget).

        Paused rows compete too, and resume when their turn comes. When every row is taken, a
        request whose key is under its fair share takes a headroom row, else a row of the key
        holding the most (or of a lower priority) is paused for it. Reports the waits."""
        chosen: list[Ticket] = []
        held = self._held_rows()
        with self._wake:
            claims: list[Ticket | Row] = [*self.paused, *self.waiting]
        keys = len({c.tenant.key for c in claims} | {k for k, n in held.items() if n > 0})
        while claims:
            claim = first(claims, held, self.served)
            assert claim is not None
            tenant = claim.tenant
            need = 1 if isinstance(claim, Row) else claim.prepared.n
            total = sum(held.values())
            room = total + need <= self.max_num_seqs or (
                total + need <= self.max_num_seqs + self.headroom_rows
                and fair_share(tenant, need, held, keys, self.max_num_seqs)
            )
            if not room:
                row = victim(self._running(), tenant, need, held)
                if row is None:
                    break
                self._pause(row)
                with self._wake:
                    self.paused.append(row)
                held[row.tenant.key] -= 1
                self.preemptions += 1
                continue
            if isinstance(claim, Row):
                if not self._resume(claim):
                    break
                with self._wake:
                    self.paused.remove(claim)
                self.resumptions += 1
            else:
                if not fits(chosen, claim):
                    break
                with self._wake:
                    shed = claim.retired  # given way to a newcomer meanwhile
                    if not shed:
                        self.waiting.remove(claim)
                if shed:
                    claims.remove(claim)
                    continue
                chosen.append(claim)
            claims.remove(claim)
            held[tenant.key] += need
        if chosen and self.on_admit is not None:
            now = time.monotonic()
            for t in chosen:
                self.on_admit(now - t.submitted, t.tenant)
        return chosen

    def _held_rows(self) -> collections.Counter[str]:
        """Rows each key holds now: decoding, and those of the prompts being prefilled."""
        held = collections.Counter(r.tenant.key for r in self._running())
        for t in self._prefilling_tickets():
            held[t.tenant.key] += t.prepared.n
        return held

    def _new_rows(self, ticket: Ticket) -> list[Row]:
        """The rows of a request whose prompt is prefilled: one per choice."""
        p = ticket.prepared
        ticket.live_rows = p.n
        ticket.used = [0] * p.n
        return [
            Row(
                ticket,
                c,
                RowDecoder(self.decode, p.stop, p.max_tokens, self.eos_ids),
                row_sampling(p, c, self.grammars),
            )
            for c in range(p.n)
        ]

    def _prompt_done(self, ticket: Ticket, scored: list[TokenLogprobs | None]) -> bool:
        """A request's prompt is in the cache: send its prompt logprobs (when asked); a request
        that generates nothing (``max_tokens`` 0: scoring the prompt) is finished here. Whether
        rows should start for it."""
        p = ticket.prepared
        if p.prompt_logprobs is not None:
            ticket.sink(PromptScored(list(p.input_ids), [None, *scored]))
        if p.max_tokens == 0:
            ticket.sink(Finished([0] * p.n, ticket.cached))
            self._retire(ticket)
            return False
        return True

    def _count_step(self, rows: int) -> None:
        self.steps += 1
        self.batch_sizes[rows] += 1
        if self.on_step is not None:
            self.on_step(rows)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> Step:
        """Sample one token per row and turn it into text: which rows go on, and the events.

        The caller evicts the rows that ended, then calls :meth:`_deliver`: a caller told
        Finished sees its rows gone.
        """
        tokens, logprobs = sample(logits, [r.sampling for r in rows])
        step = Step()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.last = token
            self.served.charge(row.tenant.key, 1)
            if row.ticket.cancelled or self._grammar_failed(row):
                step.alive.append(True)  # the next iteration evicts it with the cancelled rows
                continue
            text = row.decoder.push(token)
            reason = row.decoder.finish_reason
            scored = _scored(logprobs[i], self.eos_ids)
            if text or reason is not None or scored:
                ev = StepEvent(row.index, text, reason, len(row.decoder.tokens), scored)
                step.events.setdefault(row.ticket, []).append(ev)
            step.alive.append(reason is None)
            if reason is None:
                continue
            row.ticket.used[row.index] = len(row.decoder.tokens)
            row.ticket.live_rows -= 1
            if row.ticket.live_rows == 0:
                step.finished.append(row.ticket)
        return step

    def _grammar_failed(self, row: Row) -> bool:
        """A row whose constraint gave up mid-way fails its request (400) and the request's
        other rows are evicted as a cancelled request's are; other requests go on."""
        grammar = row.sampling.grammar
        if grammar is None or grammar.error is None:
            return False
        constraint = row.ticket.prepared.constraint
        what = constraint.what if constraint is not None else "the constraint"
        row.ticket.sink(
            BadRequest(f"{what} cannot be enforced: {grammar.error}", details={"param": what})
        )
        self.cancel(row.ticket)
        return True

    def _deliver(self, step: Step) -> None:
        """Send a step's events, and Finished to the requests it ended."""
        for ticket, evs in step.events.items():
            ticket.sink(evs)
        for ticket in step.finished:
            ticket.sink(Finished(list(ticket.used), ticket.cached))
            self._retire(ticket)


@dataclass
class Step:
    """What one step of sampling gave: per row whether it goes on, events per request, and the
    requests whose every row ended."""

    alive: list[bool] = field(default_factory=list)
    events: dict[Ticket, list[StepEvent]] = field(default_factory=dict)
    finished: list[Ticket] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        return [i for i, going_on in enumerate(self.alive) if going_on]


def _scored(logprobs: TokenLogprobs | None, eos_ids: frozenset[int]) -> list[TokenLogprobs]:
    """A step's logprobs as an event carries them: none for an end-of-sequence token (OpenAI
    reports the answer's tokens, not the end marker)."""
    return [] if logprobs is None or logprobs.token in eos_ids else [logprobs]


def score_prompt(
    logits: torch.Tensor, next_tokens: list[int], k: int
) -> list[TokenLogprobs | None]:
    """Prompt logprobs from the logits at consecutive positions: row j scores ``next_tokens[j]``
    (the token that followed), with its ``k`` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out: list[TokenLogprobs | None] = []
    for row, token in zip(logprobs, next_tokens, strict=True):
        top: list[tuple[int, float]] = []
        if k:
            values, ids = torch.topk(row, k)
            top = [(int(t), float(v)) for t, v in zip(ids, values, strict=True)]
        out.append(TokenLogprobs(int(token), float(row[token]), top))
    return out
