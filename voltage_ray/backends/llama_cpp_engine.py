"""The ``llama_cpp`` chat engine: GGUF models on CPU, llama.cpp's forward passes under
voltage_ray's own continuous batching and sampler.

Each row (a request's choice) owns a KV slot of the llama.cpp context (``seq_id``); a request's
``n`` choices share one prefill, forked into their slots. Every scheduler step is one
``llama_decode`` holding one token for every running row plus the next chunk of waiting prompts
(at most ``max_prefill_tokens``, so a long prompt is prefilled over several steps while the
others keep decoding), the shape of llama-server's slot loop (``server-context.cpp``). Sampling
is ``backends/sampler.py``'s, as on the transformers engine: per-request temperature, top_p,
seed (same text alone or batched), penalties, logit_bias, grammars and logprobs, which
llama.cpp's sampler chains (one per context) cannot mix in one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from voltage_ray.backends.chat import Prompter, TokenLogprobs
from voltage_ray.backends.engines import SchedulerBackend
from voltage_ray.backends.grammar import Grammars
from voltage_ray.backends.llama_cpp import Chunk, LlamaCppModel
from voltage_ray.backends.scheduler import Row, Scheduler, Ticket, score_prompt
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
        on_admit: Callable[[float], None] | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        super().__init__(
            decode,
            eos_ids,
            vocab=model.vocab_size,
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            on_step=on_step,
            on_admit=on_admit,
            grammars=grammars,
        )
        self.model = model
        self.free = list(range(model.n_seq_max))
        self.rows: list[Row] = []
        self.prompts: list[_Prompt] = []
        self.start()

    def _rows_running(self) -> int:
        return len(self.rows)

    def _prefilling(self) -> int:
        return len(self.prompts)

    def _held(self) -> list[Ticket]:
        return [r.ticket for r in self.rows] + [p.ticket for p in self.prompts]

    def _forget(self) -> None:
        for slot in [r.slot for r in self.rows] + [p.slot for p in self.prompts]:
            self._release(slot)
        self.rows, self.prompts = [], []

    def _release(self, slot: int) -> None:
        self.model.drop(slot)
        self.free.append(slot)

    def _iteration(self) -> None:
        self._evict_cancelled()
        self._admit()
        decoding = list(self.rows)
        chunks = [Chunk(r.slot, [r.last], r.length, True) for r in decoding]
        feeding = self._prefill_chunks(chunks)
        if not chunks:
            return
        logits = torch.from_numpy(self.model.forward(chunks))
        for r in decoding:
            r.length += 1
        if decoding:
            self._count_step(len(decoding))
        rows, index = list(decoding), list(range(len(decoding)))
        first = len(decoding)  # the logits row of the next prompt chunk
        for prompt, chunk in zip(feeding, chunks[len(decoding) :], strict=True):
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
            step = self._advance(rows, logits[index])
            self.rows = [r for r, going_on in zip(rows, step.alive, strict=True) if going_on]
            for r, going_on in zip(rows, step.alive, strict=True):
                if not going_on:
                    self._release(r.slot)
            step.deliver()

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
            self._release(r.slot)
        for p in [p for p in self.prompts if p.ticket in gone]:
            self._release(p.slot)
        self.rows = [r for r in self.rows if r.ticket not in gone]
        self.prompts = [p for p in self.prompts if p.ticket not in gone]

    def _admit(self) -> None:
        """Waiting requests, oldest first, while their ``n`` choices find free slots."""
        reserved = len(self.rows) + sum(p.ticket.prepared.n for p in self.prompts)

        def fits(chosen: list[Ticket], t: Ticket) -> bool:
            rows = reserved + sum(c.prepared.n for c in chosen) + t.prepared.n
            return rows <= min(self.max_num_seqs, self.model.n_seq_max)

        for t in self._take(fits):
            self.prompts.append(_Prompt(t, self.free.pop()))

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
            self._release(prompt.slot)
            return []
        rows = self._new_rows(prompt.ticket)
        for i, row in enumerate(rows):
            row.slot = prompt.slot if i == 0 else self.free.pop()
            row.length = prompt.ticket.prepared.prompt_tokens
            if i:
                self.model.fork(prompt.slot, row.slot)
        return rows


def threads_for(num_cpus: float) -> int:
    """llama.cpp threads for a replica given ``num_cpus``: never more than it was given."""
    return max(1, int(num_cpus))


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
        on_admit: Callable[[float], None] | None = None,
    ) -> None:
        self.prompter = Prompter(tokenizer_dir, settings)
        self.prompter.max_choices = settings.max_num_seqs  # one KV slot per choice
        self.threads = threads_for(num_cpus)
        self.model = LlamaCppModel(
            gguf_path,
            n_ctx_per_seq=self.prompter.context_length,
            n_seq_max=settings.max_num_seqs,
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
        )

    def placement(self) -> dict[str, str]:
        return {"device": "cpu", "dtype": "gguf", "threads": str(self.threads)}

    def shutdown(self) -> None:
        super().shutdown()
        self.model.close()
