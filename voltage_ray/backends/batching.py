"""Iteration-level (continuous) batching for chat: one scheduler thread per replica.

Every iteration the scheduler (1) drops cancelled rows, (2) runs at most one prefill chunk of
waiting requests (``max_prefill_tokens`` padded tokens at most, so a long prompt is split over
several iterations and never stalls running streams for longer than one chunk), merges the
prefilled rows into the running KV cache and samples their first token, and (3) decodes one token
for every running row. A row leaves the batch as soon as it finishes; a request's ``n`` choices
share one prefill whose cache rows are repeated.

Why not transformers' own ``ContinuousBatchingManager`` (``model.generate_batch`` /
``init_continuous_batching``): it samples with one ``GenerationConfig`` for the whole manager, so
it cannot honour per-request temperature, top_p, seed (a generator per row) or OpenAI's presence
and frequency penalties, and it has no ``n`` with a shared prefill. ``benchmarks/chat.py
--concurrency`` measures this loop against it. The building blocks are transformers' own: the
model's forward with ``DynamicCache`` (``batch_select_indices`` to evict), left padding with per
row attention masks and position ids.
"""

from __future__ import annotations

import collections
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from voltage_ray.backends.chat import Prepared, RowDecoder, StepEvent

logger = logging.getLogger(__name__)

TOP_P_PREFIX = 256  # top_p looks at the top-k prefix first; a full sort only when it falls short


@dataclass(frozen=True)
class Finished:
    """The last item of a generation: tokens used by each choice."""

    tokens: list[int]


Sink = Callable[[Any], object]  # receives list[StepEvent], then Finished, or an exception


@dataclass(eq=False)
class Ticket:
    """A submitted request: the caller's handle to cancel it."""

    prepared: Prepared
    sink: Sink
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancel_step: int = 0  # the scheduler's step count when it was cancelled
    live_rows: int = 0
    used: list[int] = field(default_factory=list)  # tokens of each choice, filled as rows end


@dataclass(eq=False)
class _Row:
    ticket: Ticket
    index: int  # choice index
    decoder: RowDecoder
    generator: torch.Generator | None  # None: greedy


@dataclass
class Batch:
    """Rows sharing one KV cache: left padded, ``mask`` marks real positions, ``length`` holds
    each row's real token count (its next position id)."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] long
    counts: torch.Tensor  # [rows, vocab] generated-token counts for the penalties
    last: torch.Tensor  # [rows] the last token of each row

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order, repeats allowed) and trim all-padding columns."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.counts = self.counts[index]
        self.last = self.last[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            layers: list[Any] = list(self.cache.layers)  # DynamicLayers (checked at start)
            for layer in layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]

    def keep(self, keep: list[int]) -> Batch | None:
        """This batch with only rows ``keep`` (itself when all stay), or None when none does
        (emptied in place, so a reader of the running batch sees no rows at once)."""
        if not keep:
            self.rows = []
            return None
        if len(keep) < len(self.rows):
            self.select(keep)
        return self

    def merge(self, other: Batch) -> None:
        """Append ``other``'s rows, left padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                a = F.pad(a, (0, 0, width - a.shape[-2], 0))
                b = F.pad(b, (0, 0, width - b.shape[-2], 0))
                setattr(mine, name, torch.cat([a, b]))
        self.mask = torch.cat(
            [
                F.pad(self.mask, (width - self.mask.shape[1], 0)),
                F.pad(other.mask, (width - other.mask.shape[1], 0)),
            ]
        )
        self.rows += other.rows
        self.counts = torch.cat([self.counts, other.counts])
        self.last = torch.cat([self.last, other.last])


def row_seed(seed: int, choice: int) -> int:
    """The generator seed of choice ``choice`` of a request seeded with ``seed``."""
    return (seed + choice * 0x9E3779B97F4A7C15) % (1 << 63)


def sample(logits: torch.Tensor, rows: list[_Row], counts: torch.Tensor) -> torch.Tensor:
    """One token per row, each with its own request's parameters. ``logits``: [rows, vocab]."""
    logits = logits.float()
    params = [r.ticket.prepared for r in rows]
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        dev = logits.device
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        p = params[i]
        if row.generator is None:
            continue
        tokens[i] = _sample_row(logits[i] / p.temperature, p.top_p, row.generator)
    return tokens


def _sample_row(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Nucleus sampling of one row with one uniform draw from the row's own generator."""
    u = torch.rand((), generator=generator, device=logits.device)
    if top_p >= 1.0:
        probs = torch.softmax(logits, dim=-1)
        return _pick(probs, u, None)
    lse = torch.logsumexp(logits, dim=-1)
    vals, ids = torch.topk(logits, min(TOP_P_PREFIX, logits.shape[-1]))
    probs = torch.exp(vals - lse)
    if float(probs.sum()) < top_p:  # the nucleus reaches past the prefix: sort all of it
        vals, ids = torch.sort(logits, descending=True)
        probs = torch.exp(vals - lse)
    keep = (torch.cumsum(probs, dim=-1) - probs) < top_p
    keep[0] = True
    return _pick(probs * keep, u, ids)


def _pick(probs: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    cdf = torch.cumsum(probs, dim=-1)
    j = torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True).clamp_(max=len(cdf) - 1)
    return (ids[j] if ids is not None else j)[0]


@dataclass
class _Prefill:
    """Waiting requests prefilled together, possibly over several chunks."""

    tickets: list[Ticket]
    ids: torch.Tensor  # [requests, width] left padded
    mask: torch.Tensor
    cache: DynamicCache
    done: int = 0  # columns already through the model

    @property
    def rows(self) -> int:
        return sum(t.prepared.n for t in self.tickets)


class BatchScheduler:
    """Owns the model's forward passes: submit requests from any thread, get step events back.

    ``model`` is a transformers causal LM; ``decode`` turns token ids into text for the row
    decoders. Events reach each request's ``sink`` on the scheduler thread, so sinks must only
    hand them over (e.g. ``loop.call_soon_threadsafe``).
    """

    def __init__(
        self,
        model: Any,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float], None] | None = None,
    ) -> None:
        self.model = model
        self.decode = decode
        self.eos_ids = eos_ids
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.on_step = on_step
        self.on_admit = on_admit  # hears how long each admitted request waited for a row
        self.device = model.device
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        # transformers 5.x names the forward's cache argument ``cache``; 4.x ``past_key_values``.
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        layers = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        if layers != {DynamicLayer.__name__}:  # merging and trimming assume plain KV layers
            raise ValueError(
                f"continuous batching needs full-attention KV cache layers; this model has {layers}"
            )
        self.batch: Batch | None = None
        self.prefill: _Prefill | None = None
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.steps = self.prefill_chunks = self.cancelled = 0
        self.max_prefill_chunk = 0  # most prompt tokens (padded) in one prefill forward
        self.max_eviction_lag = 0  # most decode steps between a cancel and its rows' eviction
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chat-scheduler", daemon=True)
        self._thread.start()

    # --- called from other threads -------------------------------------------------------------

    def submit(self, prepared: Prepared, sink: Sink) -> Ticket:
        ticket = Ticket(prepared, sink)
        with self._wake:
            self.waiting.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Evict ``ticket``'s rows before the next decode step (safe from any thread)."""
        ticket.cancel_step = self.steps
        ticket.cancelled = True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Rows decoding, requests waiting (prefilling included) and realized batch sizes."""
        batch, prefill = self.batch, self.prefill
        return {
            "running": len(batch) if batch else 0,
            "waiting": len(self.waiting) + (len(prefill.tickets) if prefill else 0),
            "steps": self.steps,
            "prefill_chunks": self.prefill_chunks,
            "batch_sizes": dict(sorted(dict(self.batch_sizes).items())),  # copied under the GIL
            "evicted_cancelled": self.cancelled,
            "max_eviction_lag_steps": self.max_eviction_lag,
            "max_prefill_chunk_tokens": self.max_prefill_chunk,
            "max_num_seqs": self.max_num_seqs,
            "max_prefill_tokens": self.max_prefill_tokens,
        }

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after its current step. Joined, so no torch op is still running in it
        when the interpreter exits (that aborts the process)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # --- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not (self.waiting or self.prefill or self.batch):
                    self._wake.wait()
                if self._stop:
                    return
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a failed forward fails the requests it held, not the loop
                logger.exception("chat scheduler step failed")
                self._fail_all(exc)

    def _iteration(self) -> None:
        self._evict_cancelled()
        if self.prefill is None:
            self.prefill = self._admit()
        if self.prefill is not None:
            self._prefill_chunk()
        if self.batch is not None:
            self._decode_step()

    def _evict_cancelled(self) -> None:
        with self._wake:
            for t in [t for t in self.waiting if t.cancelled]:
                self.waiting.remove(t)
                self.cancelled += 1
        if self.batch is not None and any(r.ticket.cancelled for r in self.batch.rows):
            gone = {r.ticket for r in self.batch.rows if r.ticket.cancelled}
            self.cancelled += len(gone)
            lag = max(self.steps - t.cancel_step for t in gone)
            self.max_eviction_lag = max(self.max_eviction_lag, lag)
            self.batch = self.batch.keep(
                [i for i, r in enumerate(self.batch.rows) if not r.ticket.cancelled]
            )

    def _admit(self) -> _Prefill | None:
        """Waiting requests, oldest first, within the free rows and the prefill token budget."""
        running = len(self.batch) if self.batch else 0
        chosen: list[Ticket] = []
        with self._wake:
            while self.waiting:
                t = self.waiting[0]
                rows = running + sum(c.prepared.n for c in chosen) + t.prepared.n
                width = max([t.prepared.prompt_tokens, *(c.prepared.prompt_tokens for c in chosen)])
                if chosen or running:  # the first request always goes, chunked when long
                    if rows > self.max_num_seqs:
                        break
                    if width * (len(chosen) + 1) > self.max_prefill_tokens:
                        break
                chosen.append(self.waiting.popleft())
        if not chosen:
            return None
        if self.on_admit is not None:
            now = time.monotonic()
            for t in chosen:
                self.on_admit(now - t.submitted)
        width = max(t.prepared.prompt_tokens for t in chosen)
        ids = torch.full((len(chosen), width), 0, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for i, t in enumerate(chosen):
            n = t.prepared.prompt_tokens
            ids[i, width - n :] = torch.tensor(t.prepared.input_ids)
            mask[i, width - n :] = 1
        cache = DynamicCache(config=self.model.config)
        return _Prefill(chosen, ids.to(self.device), mask.to(self.device), cache)

    def _prefill_chunk(self) -> None:
        p = self.prefill
        assert p is not None
        if any(t.cancelled for t in p.tickets):  # restart without them (rare: mid-prefill)
            self.cancelled += sum(t.cancelled for t in p.tickets)
            with self._wake:
                self.waiting.extendleft(reversed([t for t in p.tickets if not t.cancelled]))
            self.prefill = None
            return
        width = p.ids.shape[1]
        step = max(1, self.max_prefill_tokens // len(p.tickets))
        end = min(width, p.done + step)
        mask = p.mask[:, :end]
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, p.done : end]
        out = self.model(
            input_ids=p.ids[:, p.done : end],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: p.cache},
            logits_to_keep=1,
        )
        self.max_prefill_chunk = max(self.max_prefill_chunk, (end - p.done) * len(p.tickets))
        p.done = end
        self.prefill_chunks += 1
        if end < width:
            return
        self.prefill = None
        self._start_rows(p, out.logits[:, -1, :])

    def _start_rows(self, p: _Prefill, logits: torch.Tensor) -> None:
        """Repeat each request's prefill ``n`` times, sample first tokens, join the batch."""
        repeat = [i for i, t in enumerate(p.tickets) for _ in range(t.prepared.n)]
        rows = []
        for t in p.tickets:
            t.live_rows = t.prepared.n
            t.used = [0] * t.prepared.n
            rows += [self._row(t, c) for c in range(t.prepared.n)]
        index = torch.tensor(repeat, device=self.device)
        p.cache.batch_select_indices(index)
        counts = torch.zeros((len(rows), self.vocab), device=self.device)
        new = Batch(
            rows,
            p.cache,
            p.mask[index],
            counts,
            torch.zeros(len(rows), dtype=torch.long, device=self.device),
        )
        joining = self._advance(new, logits[index])
        if joining is None:
            return
        if self.batch is None:
            self.batch = joining
        else:
            self.batch.merge(joining)

    def _row(self, t: Ticket, choice: int) -> _Row:
        p = t.prepared
        generator = None
        if p.temperature > 0:  # a generator per row: the same text alone or batched
            generator = torch.Generator(device=self.device)
            seed = p.seed if p.seed is not None else secrets.randbits(62)
            generator.manual_seed(row_seed(seed, choice))
        decoder = RowDecoder(self.decode, p.stop, p.max_tokens, self.eos_ids)
        return _Row(t, choice, decoder, generator)

    def _decode_step(self) -> None:
        b = self.batch
        assert b is not None
        positions = b.mask.sum(dim=-1, keepdim=True)
        b.mask = F.pad(b.mask, (0, 1), value=1)
        out = self.model(
            input_ids=b.last[:, None],
            attention_mask=b.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: b.cache},
        )
        self.steps += 1
        self.batch_sizes[len(b)] += 1
        if self.on_step is not None:
            self.on_step(len(b))
        self.batch = self._advance(b, out.logits[:, -1, :])

    def _advance(self, b: Batch, logits: torch.Tensor) -> Batch | None:
        """Sample one token per row, hand out text, and evict the rows that finished: the batch
        of the rows that go on, or None."""
        tokens = sample(logits, b.rows, b.counts)
        b.counts[torch.arange(len(b.rows), device=b.counts.device), tokens] += 1
        b.last = tokens.to(b.last.device)
        events: dict[Ticket, list[StepEvent]] = {}
        keep = []
        finished: list[Ticket] = []
        for i, (row, token) in enumerate(zip(b.rows, tokens.tolist(), strict=True)):
            text = row.decoder.push(int(token))
            reason = row.decoder.finish_reason
            if text or reason is not None:
                ev = StepEvent(row.index, text, reason, len(row.decoder.tokens))
                events.setdefault(row.ticket, []).append(ev)
            if reason is None:
                keep.append(i)
                continue
            row.ticket.used[row.index] = len(row.decoder.tokens)
            row.ticket.live_rows -= 1
            if row.ticket.live_rows == 0:
                finished.append(row.ticket)
        going_on = b.keep(keep)  # evicted first: a caller told Finished sees its rows gone
        for ticket, evs in events.items():
            ticket.sink(evs)
        for ticket in finished:
            ticket.sink(Finished(list(ticket.used)))
        return going_on

    def _fail_all(self, exc: Exception) -> None:
        tickets: set[Ticket] = set()
        if self.batch is not None:
            tickets.update(r.ticket for r in self.batch.rows)
        if self.prefill is not None:
            tickets.update(self.prefill.tickets)
        self.batch = self.prefill = None
        for t in tickets:
            t.sink(exc)
