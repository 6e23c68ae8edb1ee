"""The transformers engine's continuous batching: a padded batch over one ``DynamicCache``.

Every iteration the scheduler (1) drops cancelled rows, (2) runs at most one prefill chunk of
waiting requests (``max_prefill_tokens`` padded tokens at most, so a long prompt is split over
several iterations and never stalls running streams for longer than one chunk), merges the
prefilled rows into the running KV cache and samples their first token, and (3) decodes one token
for every running row. A row leaves the batch as soon as it finishes; a request's ``n`` choices
share one prefill whose cache rows are repeated. What is engine-neutral (admission, rows, events,
sampling, fairness) lives in ``backends/scheduler.py``. A paused row takes its rows of the cache
with it (:meth:`Batch.split`) and is merged back when it resumes; left padding and masks make its
numerics independent of the rows beside it, so it goes on exactly as it would have.

Why not transformers' own ``ContinuousBatchingManager`` (``model.generate_batch`` /
``init_continuous_batching``): it samples with one ``GenerationConfig`` for the whole manager, so
it cannot honour per-request temperature, top_p, seed (a generator per row), OpenAI's penalties,
logit_bias, grammars or logprobs, and it has no ``n`` with a shared prefill. ``benchmarks/chat.py
--part library`` measures this loop against it. The building blocks are transformers' own: the
model's forward with ``DynamicCache`` (``batch_select_indices`` to evict), left padding with per
row attention masks and position ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from voltage_ray.backends.chat import TokenLogprobs
from voltage_ray.backends.fairness import Tenant
from voltage_ray.backends.grammar import Grammars
from voltage_ray.backends.scheduler import Row, Scheduler, Ticket, score_prompt


@dataclass
class Batch:
    """Rows sharing one KV cache: left padded, ``mask`` marks real positions."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] long

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order, repeats allowed) and trim all-padding columns."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            layers: list[Any] = list(self.cache.layers)  # DynamicLayers (checked at start)
            for layer in layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]

    def split(self, i: int, config: Any) -> Batch:
        """Row ``i`` as a batch of its own (a copy of its cache rows, padding trimmed); this
        batch keeps the others."""
        cache = DynamicCache(config=config)
        layers: list[Any] = list(self.cache.layers)  # DynamicLayers (checked at start)
        for mine, theirs in zip(list[Any](cache.layers), layers, strict=True):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys = theirs.keys[i : i + 1].clone()
            mine.values = theirs.values[i : i + 1].clone()
        alone = Batch([self.rows[i]], cache, self.mask[i : i + 1].clone())
        alone.select([0])
        self.select([j for j in range(len(self.rows)) if j != i])
        return alone

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


@dataclass
class _Prefill:
    """Waiting requests prefilled together, possibly over several chunks."""

    tickets: list[Ticket]
    ids: torch.Tensor  # [requests, width] left padded
    mask: torch.Tensor
    cache: DynamicCache
    done: int = 0  # columns already through the model
    scored: dict[int, list[TokenLogprobs | None]] = field(default_factory=dict)  # prompt logprobs


class BatchScheduler(Scheduler):
    """Continuous batching over a transformers causal LM (CPU or GPU)."""

    def __init__(
        self,
        model: Any,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, Tenant], None] | None = None,
        grammars: Grammars | None = None,
        max_queued: int | None = None,
        headroom_rows: int = 0,
    ) -> None:
        super().__init__(
            decode,
            eos_ids,
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            device=model.device,
            on_step=on_step,
            on_admit=on_admit,
            grammars=grammars,
            max_queued=max_queued,
            headroom_rows=headroom_rows,
        )
        self.model = model
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
        self.start()

    def _rows_running(self) -> int:
        batch = self.batch
        return len(batch) if batch else 0

    def _prefilling(self) -> int:
        prefill = self.prefill
        return len(prefill.tickets) if prefill else 0

    def _held(self) -> list[Ticket]:
        held = [r.ticket for r in self.batch.rows] if self.batch else []
        return held + (list(self.prefill.tickets) if self.prefill else [])

    def _running(self) -> list[Row]:
        return list(self.batch.rows) if self.batch else []

    def _prefilling_tickets(self) -> list[Ticket]:
        return list(self.prefill.tickets) if self.prefill else []

    def _pause(self, row: Row) -> None:
        assert self.batch is not None
        i = self.batch.rows.index(row)
        if len(self.batch) == 1:
            row.saved, self.batch = self.batch, None
        else:
            row.saved = self.batch.split(i, self.model.config)

    def _resume(self, row: Row) -> bool:
        saved, row.saved = row.saved, None
        if self.batch is None:
            self.batch = saved
        else:
            self.batch.merge(saved)
        return True

    def _forget(self) -> None:
        self.batch = self.prefill = None

    def _iteration(self) -> None:
        self._evict_cancelled()
        if self.prefill is None:
            self.prefill = self._admit()
        if self.prefill is not None:
            self._prefill_chunk()
        if self.batch is not None:
            self._decode_step()

    def _evict_cancelled(self) -> None:
        self._drop_cancelled_waiting()
        if self.batch is not None and any(r.ticket.cancelled for r in self.batch.rows):
            self._note_cancelled({r.ticket for r in self.batch.rows if r.ticket.cancelled})
            self.batch = self.batch.keep(
                [i for i, r in enumerate(self.batch.rows) if not r.ticket.cancelled]
            )

    def _admit(self) -> _Prefill | None:
        """Waiting requests in fair order (``Scheduler._take``) within the prefill token budget."""

        def fits(chosen: list[Ticket], t: Ticket) -> bool:
            if not chosen:  # the first request always goes, chunked when long
                return True
            width = max([t.prepared.prompt_tokens, *(c.prepared.prompt_tokens for c in chosen)])
            return width * (len(chosen) + 1) <= self.max_prefill_tokens

        chosen = self._take(fits)
        if not chosen:
            return None
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
            self._note_cancelled({t for t in p.tickets if t.cancelled})
            with self._wake:
                self.waiting[:0] = [t for t in p.tickets if not t.cancelled]
            self.prefill = None
            return
        width = p.ids.shape[1]
        step = max(1, self.max_prefill_tokens // len(p.tickets))
        end = min(width, p.done + step)
        mask = p.mask[:, :end]
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, p.done : end]
        scoring = [i for i, t in enumerate(p.tickets) if t.prepared.prompt_logprobs is not None]
        out = self._forward(
            lambda: self.model(
                input_ids=p.ids[:, p.done : end],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: p.cache},
                logits_to_keep=0 if scoring else 1,  # 0: every position's (prompt logprobs)
            )
        )
        for i in scoring:
            self._score_chunk(p, i, out.logits[i], end)
        self.max_prefill_chunk = max(self.max_prefill_chunk, (end - p.done) * len(p.tickets))
        p.done = end
        self.prefill_chunks += 1
        if end < width:
            return
        self.prefill = None
        self._start_rows(p, out.logits[:, -1, :])

    def _score_chunk(self, p: _Prefill, i: int, logits: torch.Tensor, end: int) -> None:
        """Prompt logprobs of request ``i`` from this chunk's columns (left padding skipped):
        the column at c scores the prompt token at c + 1."""
        width, start = p.ids.shape[1], p.ids.shape[1] - p.tickets[i].prepared.prompt_tokens
        first, last = max(p.done, start), min(end, width - 1)
        if first >= last:
            return
        k = p.tickets[i].prepared.prompt_logprobs or 0
        nxt = [int(t) for t in p.ids[i, first + 1 : last + 1]]
        rows = logits[first - p.done : last - p.done]
        p.scored.setdefault(i, []).extend(score_prompt(rows, nxt, k))

    def _start_rows(self, p: _Prefill, logits: torch.Tensor) -> None:
        """Repeat each request's prefill ``n`` times, sample first tokens, join the batch."""
        going = [i for i, t in enumerate(p.tickets) if self._prompt_done(t, p.scored.get(i, []))]
        if not going:
            return
        repeat = [i for i in going for _ in range(p.tickets[i].prepared.n)]
        rows = [row for i in going for row in self._new_rows(p.tickets[i])]
        index = torch.tensor(repeat, device=self.device)
        p.cache.batch_select_indices(index)
        new = Batch(rows, p.cache, p.mask[index])
        joining = self._sample(new, logits[index])
        if joining is None:
            return
        if self.batch is None:
            self.batch = joining
        else:
            self.batch.merge(joining)

    def _decode_step(self) -> None:
        b = self.batch
        assert b is not None
        positions = b.mask.sum(dim=-1, keepdim=True)
        b.mask = F.pad(b.mask, (0, 1), value=1)
        last = torch.tensor([r.last for r in b.rows], device=self.device)
        out = self._forward(
            lambda: self.model(
                input_ids=last[:, None],
                attention_mask=b.mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: b.cache},
            )
        )
        self._count_step(len(b))
        self.batch = self._sample(b, out.logits[:, -1, :])

    def _sample(self, b: Batch, logits: torch.Tensor) -> Batch | None:
        """Advance every row of ``b`` by one token; the batch of the rows that go on, or None."""
        step = self._advance(b.rows, logits)
        going_on = b.keep(step.kept)  # evicted first: a caller told Finished sees its rows gone
        self._deliver(step)
        return going_on
