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
built on it against transformers' own.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from voltage_ray.backends.chat import Prepared, TokenLogprobs
from voltage_ray.backends.grammar import Grammars, RowGrammar

TOP_P_PREFIX = 256  # top_p looks at the top-k prefix first; a full sort only when it falls short
MIN_LOGPROB = -9999.0  # JSON has no -inf; a token the constraint forbids reports this


@dataclass(eq=False)
class RowSampling:
    """One row's sampling state: its request's parameters, generator, grammar, bias, and the
    count of each token it generated (for the penalties; None without penalties)."""

    params: Prepared
    generator: torch.Generator | None  # None: greedy
    grammar: RowGrammar | None
    bias: tuple[torch.Tensor, torch.Tensor] | None  # (token ids, values)
    counts: torch.Tensor | None = None  # [vocab] float


def row_seed(seed: int, choice: int) -> int:
    """The generator seed of choice ``choice`` of a request seeded with ``seed``."""
    return (seed + choice * 0x9E3779B97F4A7C15) % (1 << 63)


def row_sampling(
    p: Prepared, choice: int, device: torch.device | str, grammars: Grammars | None, vocab: int
) -> RowSampling:
    """The sampling state of choice ``choice`` of ``p``: a generator per row, so a seeded
    request gives the same text alone or batched."""
    generator = None
    if p.temperature > 0:
        generator = torch.Generator(device=device)
        seed = p.seed if p.seed is not None else secrets.randbits(62)
        generator.manual_seed(row_seed(seed, choice))
    grammar = None
    if p.constraint is not None:
        if grammars is None:
            raise ValueError("a constrained request reached an engine without grammars")
        grammar = grammars.matcher(p.constraint)
    bias = None
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
        bias = (ids, torch.tensor(list(p.logit_bias.values()), device=device))
    counts = None
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.zeros(vocab, device=device)
    return RowSampling(p, generator, grammar, bias, counts)


def sample(
    logits: torch.Tensor, rows: list[RowSampling]
) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
    """One token per row and, for rows that asked, its logprobs. ``logits``: [rows, vocab]."""
    masked = [i for i, r in enumerate(rows) if r.grammar is not None]
    biased = [i for i, r in enumerate(rows) if r.bias is not None]
    penalized = [i for i, r in enumerate(rows) if r.counts is not None]
    logits = logits.float()
    if masked or biased or penalized:  # edited in place below: never the caller's tensor
        logits = logits.clone()
    if masked:
        for i in masked:
            grammar = rows[i].grammar
            assert grammar is not None
            allowed = grammar.allowed().to(logits.device)
            width = min(len(allowed), logits.shape[-1])
            logits[i, :width].masked_fill_(~allowed[:width], -math.inf)
            logits[i, width:] = -math.inf
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    for i in penalized:  # OpenAI's: frequency x count, presence x (count > 0)
        counts, p = rows[i].counts, rows[i].params
        assert counts is not None
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if biased:
        for i in biased:
            ids, values = rows[i].bias  # type: ignore[misc]
            logits[i].index_add_(0, ids, values)
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.generator is not None:
            scaled = logits[i] / row.params.temperature
            tokens[i] = _sample_row(scaled, row.params.top_p, row.generator)
    chosen = tokens.tolist()
    for i in penalized:
        counts = rows[i].counts
        assert counts is not None
        counts[chosen[i]] += 1
    for i in masked:
        grammar = rows[i].grammar
        assert grammar is not None
        grammar.consume(int(chosen[i]))
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw is not None:
        for j, i in enumerate(wanted):
            logprobs[i] = _logprobs(raw[j], int(chosen[i]), rows[i].params.logprobs or 0)
    return tokens, logprobs


def _logprobs(row: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(row, min(k, row.shape[-1]))
        top = [(int(t), max(float(v), MIN_LOGPROB)) for t, v in zip(ids, values, strict=True)]
    return TokenLogprobs(token, max(float(row[token]), MIN_LOGPROB), top)


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
