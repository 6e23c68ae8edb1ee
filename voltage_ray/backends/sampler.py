"""One sampler for every CPU engine: a batch's logits in, one token per row out, each row with
its own request's parameters (:class:`Prepared`).

Per step and row, in this order: the structured-output mask (the row's grammar), the logprobs
(read here: the model's distribution within the constraint, before logit_bias, penalties,
temperature and top_p, which is vLLM's default ``raw_logprobs``, so both engines report the same
thing), OpenAI's presence and frequency penalties, logit_bias, then argmax (temperature 0) or
nucleus sampling with one uniform draw from the row's own generator.

Why not the libraries' samplers: transformers' ``LogitsProcessor``s (and its continuous-batching
manager) and llama.cpp's sampler chains take one configuration per batch or per context, while a
continuous batch mixes requests with different temperatures, top_p, seeds, penalties, biases,
grammars and logprobs; a per-row generator with exactly one draw per step is what makes a seeded
request give the same text alone or batched. One sampler for both CPU engines also means every
field is honoured the same way whichever engine runs. ``benchmarks/chat.py`` measures the loop
built on it against transformers' own, ``benchmarks/chat_engines.py`` against llama-server.

Rows are worked on as NumPy arrays, in as few vocabulary-wide passes as the row needs: on one
CPU thread (the llama.cpp engine leaves the cores to llama.cpp), torch's ``argmax`` and ``topk``
over a 49k vocabulary took 75 and 130 us where NumPy's ``argmax`` takes 4, and a sampled row with
penalties cost 0.75 ms a token before (0.1 ms now; ``benchmarks/sampler.py``). Penalties touch
only the tokens a row generated; top_p sorts only the tokens holding at least
``CANDIDATE_SHARE`` of the mass when those cover ``top_p`` (they do but for near-flat rows).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from voltage_ray.backends.chat import Prepared, TokenLogprobs
from voltage_ray.backends.grammar import Grammars, RowGrammar

# top_p and sampling look first at the tokens with at least this share of the row's mass (at
# most 1 / CANDIDATE_SHARE of them); the rest of the vocabulary only when those fall short.
CANDIDATE_SHARE = 1e-4
MIN_LOGPROB = -9999.0  # JSON has no -inf; a token the constraint forbids reports this
# A smaller temperature counts as this one (dividing by it could overflow float32): sampling
# is then the argmax, exact ties sharing the draw.
MIN_TEMPERATURE = 1e-6


@dataclass(eq=False)
class RowSampling:
    """One row's sampling state: its request's parameters, generator, grammar, bias, and how
    often it generated each token (for the penalties; None without penalties)."""

    params: Prepared
    generator: torch.Generator | None  # None: greedy
    grammar: RowGrammar | None
    bias: tuple[np.ndarray, np.ndarray] | None  # (token ids, values)
    counts: dict[int, int] | None = None

    def penalty(self) -> tuple[np.ndarray, np.ndarray]:
        """OpenAI's penalties as (token ids, amounts): frequency x count + presence, for the
        tokens generated so far."""
        counts, p = self.counts or {}, self.params
        ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        amounts = p.frequency_penalty * n + np.float32(p.presence_penalty)
        return ids, amounts.astype(np.float32)

    def generated(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1


def row_seed(seed: int, choice: int) -> int:
    """The generator seed of choice ``choice`` of a request seeded with ``seed``."""
    return (seed + choice * 0x9E3779B97F4A7C15) % (1 << 63)


def row_sampling(p: Prepared, choice: int, grammars: Grammars | None) -> RowSampling:
    """The sampling state of choice ``choice`` of ``p``: a generator per row, so a seeded
    request gives the same text alone or batched."""
    generator = None
    if p.temperature > 0:
        generator = torch.Generator()
        seed = p.seed if p.seed is not None else secrets.randbits(62)
        generator.manual_seed(row_seed(seed, choice))
    grammar = None
    if p.constraint is not None:
        if grammars is None:
            raise ValueError("a constrained request reached an engine without grammars")
        grammar = grammars.matcher(p.constraint)
    bias = None
    if p.logit_bias:
        ids = np.fromiter(p.logit_bias, dtype=np.int64, count=len(p.logit_bias))
        bias = (ids, np.array(list(p.logit_bias.values()), dtype=np.float32))
    counts: dict[int, int] | None = {} if p.presence_penalty or p.frequency_penalty else None
    return RowSampling(p, generator, grammar, bias, counts)


def sample(
    logits: torch.Tensor, rows: list[RowSampling]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row and, for rows that asked, its logprobs. ``logits``: [rows, vocab], on
    any device (the rows are sampled on the CPU)."""
    batch = logits.detach().float().cpu().numpy()
    chosen: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for x, row in zip(batch, rows, strict=True):
        p = row.params
        edited = row.grammar is not None or row.bias is not None or row.counts
        if edited:  # edited in place below: never the caller's logits
            x = x.copy()
        if row.grammar is not None:
            allowed = row.grammar.allowed()
            width = min(len(allowed), len(x))
            x[:width][~allowed[:width]] = -np.inf
            x[width:] = -np.inf
        scored = None
        if p.logprobs is not None:
            scored = torch.log_softmax(torch.from_numpy(x), dim=-1)
        if row.counts:
            ids, amounts = row.penalty()
            x[ids] -= amounts
        if row.bias is not None:
            ids, values = row.bias
            x[ids] += values
        if row.generator is None:
            token = int(x.argmax())
        else:
            u = float(torch.rand((), generator=row.generator))
            token = _sample_row(x, p.temperature, p.top_p, u)
        chosen.append(token)
        row.generated(token)
        if row.grammar is not None:
            row.grammar.consume(token)
        logprobs.append(None if scored is None else _logprobs(scored, token, p.logprobs or 0))
    return chosen, logprobs


def _logprobs(row: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(row, min(k, row.shape[-1]))
        top = [(int(t), max(float(v), MIN_LOGPROB)) for t, v in zip(ids, values, strict=True)]
    return TokenLogprobs(token, max(float(row[token]), MIN_LOGPROB), top)


def _sample_row(x: np.ndarray, temperature: float, top_p: float, u: float) -> int:
    """Nucleus sampling of one row by inverse CDF with the uniform draw ``u``: the tokens in
    descending probability, the smallest head holding ``top_p`` of the mass (all of them at
    ``top_p`` 1, where the order does not change the distribution: the candidates first, the
    rest in vocabulary order)."""
    e = np.subtract(x, x.max())
    e /= np.float32(max(temperature, MIN_TEMPERATURE))  # e: log-probabilities over the max's
    np.exp(e, out=e)
    total = float(e.sum())
    ids = np.flatnonzero(e >= CANDIDATE_SHARE * total)
    head = e[ids]
    whole = top_p >= 1.0
    if not whole and float(head.sum()) < top_p * total:
        ids = np.flatnonzero(e)  # a near-flat row: the nucleus reaches past the candidates
        head = e[ids]
    order = np.argsort(-head, kind="stable")
    ids, head = ids[order], head[order]
    cdf = np.cumsum(head, dtype=np.float64)
    if whole:
        target = u * total
        held = float(cdf[-1]) if len(cdf) else 0.0  # no candidates in a flat row
        if target < held or len(ids) == len(e):
            return int(ids[min(int(np.searchsorted(cdf, target, "right")), len(ids) - 1)])
        rest = e.astype(np.float64)
        rest[ids] = 0.0
        if not rest.any():  # every token with mass is a candidate: u * total rounded past them
            return int(ids[-1])
        left = np.cumsum(rest)
        j = int(np.searchsorted(left, target - held, "right"))
        return j if j < len(e) and rest[j] > 0 else int(np.flatnonzero(rest)[-1])
    n = max(1, int(np.searchsorted(cdf - head, top_p * total, "left")))  # mass before < top_p
    j = int(np.searchsorted(cdf[:n], u * cdf[n - 1], "right"))
    return int(ids[min(j, n - 1)])
