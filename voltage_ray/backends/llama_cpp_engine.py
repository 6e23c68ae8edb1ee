"""The ``llama_cpp`` chat engine: GGUF models on CPU, llama.cpp's forward passes under
voltage_ray's own continuous batching and sampler.

Each row (a request's choice) owns a KV slot of the llama.cpp context (``seq_id``); a request's
``n`` choices share one prefill, forked into their slots. Every scheduler step is the next chunk
of waiting prompts (at most ``max_prefill_tokens``, so a long prompt is prefilled over several
steps while the others keep decoding), then one ``llama_decode`` holding one token for every
running row: the shape of llama-server's slot loop (``server-context.cpp``), except that the
prompt chunk goes in a pass of its own, first. Its first token then comes a pass sooner: a new
request waits for the prefill alone, not for a decode step of every running row too (SmolLM2,
one thread, 8 rows: about 70 ms a step). The rows' work per step is the same either way.

A paused row (preempted for a key under its fair share, ``backends/scheduler.py``) leaves its
slot: its cells are copied to host memory (``LlamaCppModel.save``) and restored, byte for byte,
into whichever slot it resumes in, so it goes on with exactly the text it would have produced.

Prefix caching (``enable_prefix_caching``, on by default), as llama-server's ``cache_prompt``: a
finished row's slot keeps its KV cells (prompt and answer); a new prompt takes the free slot
whose kept tokens share its longest prefix and computes only the rest (a long system prompt,
the earlier turns of a conversation, a benchmark's repeated prompts): ``_claim``. Cells a slot
has to give up are copied to host memory first (``host_prefix_cache_mb``, as llama-server's
``--cache-ram``) and restored into any slot when a prompt starts like them. Greedy text is the
same with and without (tested).

Sampling is ``backends/sampler.py``'s, as on the transformers engine: per-request temperature,
top_p, seed (same text alone or batched), penalties, logit_bias, grammars and logprobs, which
llama.cpp's sampler chains (one per context) cannot mix in one batch.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from voltage_ray.backends.chat import Prompter, TokenLogprobs
from voltage_ray.backends.engines import SchedulerBackend
from voltage_ray.backends.fairness import Tenant
from voltage_ray.backends.grammar import Grammars
from voltage_ray.backends.llama_cpp import Chunk, LlamaCppError, LlamaCppModel
from voltage_ray.backends.scheduler import Row, Scheduler, Step, Ticket, score_prompt
from voltage_ray.config import ChatSettings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Prompt:
    """A request whose prompt is being prefilled into ``slot``."""

    ticket: Ticket
    slot: int
    done: int = 0  # prompt tokens already in the slot
    scored: list[TokenLogprobs | None] = field(default_factory=list)  # prompt logprobs so far

    @property
    def left(self) -> int:
        return self.ticket.prepared.prompt_tokens - self.done


# Fewer reused tokens than this are not worth a copy of a slot's cells to or from host memory.
HOST_MIN_TOKENS = 8


@dataclass(eq=False)
class _Saved:
    tokens: list[int]
    state: Any  # ctypes byte array from LlamaCppModel.save


class HostPrefixes:
    """KV cells of prefixes that had to leave their slot, in host memory, within ``max_bytes``
    (least recently used out first): llama-server's ``--cache-ram``. A prefix of a saved entry
    is not saved again; an entry that a newer one extends is replaced by it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: collections.OrderedDict[int, _Saved] = collections.OrderedDict()
        self._next = 0

    def put(self, tokens: list[int], state: Any) -> None:
        if len(state) > self.max_bytes:
            return
        for key, e in list(self.entries.items()):
            n = _common_prefix(e.tokens, tokens)
            if n == len(tokens):  # already held, within a longer entry
                self.entries.move_to_end(key)
                return
            if n == len(e.tokens):  # superseded by this longer one
                self._remove(key)
        self.entries[self._next] = _Saved(tokens, state)
        self._next += 1
        self.bytes += len(state)
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def best(self, ids: Sequence[int]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``ids``, and that length."""
        found, length = None, 0
        for key, e in self.entries.items():
            n = _common_prefix(e.tokens, ids)
            if n > length:
                found, length = key, n
        return found, length

    def use(self, key: int) -> _Saved:
        self.entries.move_to_end(key)
        return self.entries[key]

    def _remove(self, key: int) -> None:
        self.bytes -= len(self.entries.pop(key).state)


class LlamaCppScheduler(Scheduler):
    """Continuous batching over a :class:`LlamaCppModel` with ``max_num_seqs`` KV slots."""

    def __init__(
        self,
        model: LlamaCppModel,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, Tenant], None] | None = None,
        grammars: Grammars | None = None,
        prefix_caching: bool = True,
        host_cache_bytes: int = 0,
        max_queued: int | None = None,
        headroom_rows: int = 0,
    ) -> None:
        super().__init__(
            decode,
            eos_ids,
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            on_step=on_step,
            on_admit=on_admit,
            grammars=grammars,
            max_queued=max_queued,
            headroom_rows=headroom_rows,
        )
        if model.n_seq_max < max_num_seqs + headroom_rows:
            raise ValueError("the model needs a KV slot for every row, headroom rows included")
        self.model = model
        self.free = list(range(model.n_seq_max))  # least recently freed first
        self.kept: dict[int, list[int]] = {}  # a free slot: the tokens its KV cells still hold
        self.prefix_caching = prefix_caching
        on_host = prefix_caching and host_cache_bytes > 0
        self.host = HostPrefixes(host_cache_bytes) if on_host else None
        self.cached_prompt_tokens = 0  # prompt tokens taken from kept cells, not computed
        self.restored_prompt_tokens = 0  # of those, restored from host memory
        self.rows: list[Row] = []
        self.prompts: list[_Prompt] = []
        self.start()

    def _rows_running(self) -> int:
        return len(self.rows)

    def _prefilling(self) -> int:
        return len(self.prompts)

    def _held(self) -> list[Ticket]:
        return [r.ticket for r in self.rows] + [p.ticket for p in self.prompts]

    def _running(self) -> list[Row]:
        return self.rows

    def _prefilling_tickets(self) -> list[Ticket]:
        return [p.ticket for p in self.prompts]

    def _pause(self, row: Row) -> None:
        row.saved = self.model.save(row.slot)
        self.rows.remove(row)
        self._release(row.slot, _cells(row))  # its cells stay there too, for prefix reuse

    def _resume(self, row: Row) -> bool:
        if not self.free:
            return False
        near = frozenset(r.slot for r in self.rows)
        row.slot = self._claim((), False, near)[0]
        self.model.restore(row.slot, row.saved)
        row.saved = None
        self.rows.append(row)
        return True

    def stats(self) -> dict[str, Any]:
        host = self.host
        return {
            **super().stats(),
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "restored_prompt_tokens": self.restored_prompt_tokens,
            "host_prefixes": len(host.entries) if host else 0,
            "host_prefix_bytes": host.bytes if host else 0,
        }

    def _forget(self) -> None:
        for slot in [r.slot for r in self.rows] + [p.slot for p in self.prompts]:
            self._release(slot)
        self.rows, self.prompts = [], []

    def _release(self, slot: int, tokens: list[int] | None = None) -> None:
        """Free ``slot``; with prefix caching its cells stay, holding ``tokens`` (None or
        empty: unknown or nothing, dropped)."""
        if tokens and self.prefix_caching:
            self.kept[slot] = tokens
        else:
            self.model.drop(slot)
            self.kept.pop(slot, None)
        self.free.append(slot)

    def _claim(
        self, ids: Sequence[int], reuse: bool, near: frozenset[int] = frozenset()
    ) -> tuple[int, int]:
        """A free slot for a prompt of ``ids`` and how many of them its cells already hold.

        First, a slot next to a busy one (running, prefilling, or in ``near``) while any is
        free: llama.cpp computes each run of consecutive slots in its own pass, so a scattered
        row would cost every step a pass (see ``backends/llama_cpp.py``). Among those, the slot
        whose kept tokens share the longest prefix, when that is at least half the prompt (an
        earlier turn, a long shared system prompt, the same prompt again); otherwise an empty
        slot, so that a short common head (the chat template's default system prompt) does not
        cost another prompt its cells; else the least recently freed. Cells the slot loses go
        to host memory; a longer prefix held there is restored into the slot. At least the
        last prompt token is computed again: its logits choose the first token.
        """
        busy = {r.slot for r in self.rows} | {p.slot for p in self.prompts} | near
        beside = [s for s in self.free if s - 1 in busy or s + 1 in busy]
        slots = beside or self.free  # least recently freed first
        keeps = {s: _common_prefix(self.kept[s], ids) for s in slots if s in self.kept}
        best = max(keeps, key=keeps.__getitem__, default=None) if reuse else None
        if best is not None and 2 * keeps[best] >= len(ids):
            slot = best
        else:
            empty = [s for s in slots if s not in self.kept]
            slot = empty[0] if empty else slots[0]
        keep = max(0, min(keeps.get(slot, 0) if reuse else 0, len(ids) - 1))
        self.free.remove(slot)
        kept = self.kept.pop(slot, None)
        if kept is not None and self.host is not None and len(kept) - keep >= HOST_MIN_TOKENS:
            self.host.put(kept, self.model.save(slot))  # what the slot loses stays on the host
        if reuse and self.host is not None:
            key, n = self.host.best(ids)
            n = min(n, len(ids) - 1)
            if key is not None and n - keep >= HOST_MIN_TOKENS:
                saved = self.host.use(key)
                try:
                    self.model.restore(slot, saved.state)
                    kept, keep = saved.tokens, n
                    self.restored_prompt_tokens += n
                except LlamaCppError:  # the slot is empty now: the prompt is computed whole
                    logger.warning("could not restore a saved prefix", exc_info=True)
                    kept, keep = None, 0
        if kept is not None:
            self.model.truncate(slot, keep)
        self.cached_prompt_tokens += keep
        return slot, keep

    def _iteration(self) -> None:
        self._evict_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _prefill(self) -> None:
        """The next prompt chunks, in a pass of their own: the prompts they finish start their
        rows with a first token each (sampled here, sent at once)."""
        chunks: list[Chunk] = []
        feeding = self._prefill_chunks(chunks)
        if not chunks:
            return
        logits = torch.from_numpy(self._forward(lambda: self.model.forward(chunks)))
        rows: list[Row] = []
        index: list[int] = []
        first = 0  # the logits row of the next chunk
        for prompt, chunk in zip(feeding, chunks, strict=True):
            if chunk.every:
                self._score(prompt, chunk, logits[first : first + chunk.outputs])
            first += chunk.outputs
            if not chunk.logits:  # more of its prompt to come
                continue
            self.prompts.remove(prompt)
            started = self._start_rows(prompt)
            rows += started
            index += [first - 1] * len(started)
        if rows:
            self._settle(rows, self._advance(rows, logits[index]))

    def _decode(self) -> None:
        """One token for every running row, in one pass."""
        rows = list(self.rows)
        if not rows:
            return
        chunks = [Chunk(r.slot, [r.last], r.length, True) for r in rows]
        logits = torch.from_numpy(self._forward(lambda: self.model.forward(chunks)))
        for r in rows:
            r.fed.append(r.last)
            r.length += 1
        self._count_step(len(rows))
        self.rows = []  # _settle puts back those that go on
        self._settle(rows, self._advance(rows, logits))

    def _settle(self, rows: list[Row], step: Step) -> None:
        """Rows that go on join the running ones, the others free their slots; then the step's
        events go out (a caller told Finished sees its rows gone)."""
        for r, going_on in zip(rows, step.alive, strict=True):
            if going_on:
                self.rows.append(r)
            else:
                self._release(r.slot, _cells(r))
        self._deliver(step)

    def _score(self, prompt: _Prompt, chunk: Chunk, logits: torch.Tensor) -> None:
        """Prompt logprobs from a chunk's rows: row j scores the prompt token after it (the last
        row of the prompt's last chunk scores nothing: it is the first token's distribution)."""
        ids = prompt.ticket.prepared.input_ids
        nxt = ids[chunk.pos + 1 : chunk.pos + len(chunk.tokens) + 1]
        k = prompt.ticket.prepared.prompt_logprobs or 0
        prompt.scored.extend(score_prompt(logits[: len(nxt)], nxt, k))

    def _evict_cancelled(self) -> None:
        self._drop_cancelled_waiting()
        gone = {r.ticket for r in self.rows if r.ticket.cancelled}
        gone |= {p.ticket for p in self.prompts if p.ticket.cancelled}
        if not gone:
            return
        self._note_cancelled(gone)
        for r in [r for r in self.rows if r.ticket in gone]:
            self._release(r.slot, _cells(r))
        for p in [p for p in self.prompts if p.ticket in gone]:
            self._release(p.slot, list(p.ticket.prepared.input_ids[: p.done]))
        self.rows = [r for r in self.rows if r.ticket not in gone]
        self.prompts = [p for p in self.prompts if p.ticket not in gone]

    def _admit(self) -> None:
        """Waiting requests in fair order (``Scheduler._take``: a slot for every row)."""
        for t in self._take(lambda chosen, t: True):
            p = t.prepared
            reuse = self.prefix_caching and p.prompt_logprobs is None  # scoring needs every row
            slot, keep = self._claim(p.input_ids, reuse)
            t.cached = keep
            self.prompts.append(_Prompt(t, slot, done=keep))

    def _prefill_chunks(self, chunks: list[Chunk]) -> list[_Prompt]:
        """Add the next prompt chunks (``max_prefill_tokens`` in all) to ``chunks``; the prompts
        fed, in ``chunks`` order (a chunk wants logits when its prompt's last token is in it)."""
        budget = self.max_prefill_tokens
        feeding, fed = [], 0
        for p in self.prompts:
            if budget <= 0:
                break
            take = min(budget, p.left)
            ids = p.ticket.prepared.input_ids[p.done : p.done + take]
            scoring = p.ticket.prepared.prompt_logprobs is not None
            chunks.append(Chunk(p.slot, ids, p.done, take == p.left, every=scoring))
            p.done += take
            budget -= take
            fed += take
            feeding.append(p)
        if fed:
            self.prefill_chunks += 1
            self.max_prefill_chunk = max(self.max_prefill_chunk, fed)
        return feeding

    def _start_rows(self, prompt: _Prompt) -> list[Row]:
        """The rows of a prefilled prompt: choice 0 in its slot, the others forked from it
        (none, its slot freed, for a request that only scores its prompt)."""
        if not self._prompt_done(prompt.ticket, prompt.scored):
            self._release(prompt.slot, list(prompt.ticket.prepared.input_ids))
            return []
        rows = self._new_rows(prompt.ticket)
        for i, row in enumerate(rows):
            near = frozenset(r.slot for r in rows[:i])
            row.slot = prompt.slot if i == 0 else self._claim((), False, near)[0]
            row.length = prompt.ticket.prepared.prompt_tokens
            if i:
                self.model.fork(prompt.slot, row.slot)
        return rows


def _cells(row: Row) -> list[int]:
    """The tokens a row's KV slot holds: its prompt and the answer tokens fed so far."""
    return [*row.ticket.prepared.input_ids, *row.fed]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def threads_for(num_cpus: float) -> int:
    """llama.cpp threads for a replica given ``num_cpus`` and no ``chat.threads``."""
    return max(1, int(num_cpus))


# Threads of a one-token pass (one row decoding); None: all of them, as every larger pass.
# NOTE: measured in process on 2 idle cores (SmolLM2 Q4_1, median step): one row 12.3-12.5 ms
# on 1 thread vs 7.7-8.1 ms on 2; 2 rows 22.7 vs 13.9; 8 rows 61 vs 33-38; a 200-token prompt
# chunk 1.13-1.23 s vs 0.58 s. Served (serve_config.yaml, one greedy stream, a loaded box):
# 68.3 tok/s with 2 threads for one row vs 52.8 with 1 (poll 50, one run each). No step shape
# measured faster on fewer threads here, so the rule (``llama_cpp.threads_for_step``) keeps them
# all; a bigger node, where one row cannot feed many threads, would set it.
ONE_ROW_THREADS: int | None = None
# ggml's polling between passes (0-100; its default 50 spins up to 1024 * 128 * 50 pause loops,
# longer than a step here, so an idle pool thread holds its core while this process samples and
# the ingress and proxy relay the token). NOTE: 0, the pool's threads sleep as soon as a pass
# ends and wake on the next (a futex wake per pass): the cores go to the serving stack between
# steps.
POOL_POLL = 0


class LlamaCppBackend(SchedulerBackend):
    """The llama.cpp engine: a GGUF file run by llama.cpp, prompts by the model's tokenizer."""

    name = "llama_cpp"

    def __init__(
        self,
        gguf_path: str,
        tokenizer_dir: str,
        settings: ChatSettings,
        num_cpus: float,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[float, Tenant], None] | None = None,
        max_queued: int | None = None,
    ) -> None:
        # NOTE: the sampler works row by row on the scheduler thread (NumPy, and torch for
        # logprobs); torch's own intra-op threads would spin in OpenMP after each op, on the
        # very cores llama.cpp's threads need: SmolLM2 decoded a token in 14 ms with torch's
        # default threads and in 8.8 ms with one (in process, 2 cores; llama-server takes 8.2).
        # One torch thread for the whole replica process.
        torch.set_num_threads(1)
        self.prompter = Prompter(tokenizer_dir, settings)
        self.prompter.max_choices = settings.max_num_seqs  # one KV slot per choice
        self.threads = settings.threads or threads_for(num_cpus)
        self.model = LlamaCppModel(
            gguf_path,
            one_row_threads=ONE_ROW_THREADS,
            poll=POOL_POLL,
            n_ctx_per_seq=self.prompter.context_length,
            n_seq_max=settings.max_num_seqs + settings.headroom_rows,
            n_threads=self.threads,
            n_batch=max(512, settings.max_prefill_tokens + settings.max_num_seqs),
        )
        if self.model.vocab_size != self.prompter.vocab_size:
            raise ValueError(
                f"{gguf_path}: llama.cpp's vocabulary ({self.model.vocab_size}) differs from the "
                f"tokenizer's ({self.prompter.vocab_size})"
            )
        self.scheduler = LlamaCppScheduler(
            self.model,
            self.prompter.decode,
            self.prompter.eos_ids,
            max_num_seqs=settings.max_num_seqs,
            max_prefill_tokens=settings.max_prefill_tokens,
            on_step=on_step,
            on_admit=on_admit,
            grammars=self.prompter.grammars,
            prefix_caching=settings.enable_prefix_caching,
            host_cache_bytes=settings.host_prefix_cache_mb << 20,
            max_queued=max_queued,
            headroom_rows=settings.headroom_rows,
        )

    def placement(self) -> dict[str, str]:
        return {"device": "cpu", "dtype": "gguf", "threads": str(self.threads)}

    def shutdown(self) -> None:
        super().shutdown()
        self.model.close()
