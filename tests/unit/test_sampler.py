"""The shared CPU sampler on hand-made logits: per-row parameters, logit_bias, logprobs, masks."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.chat_requests import prepared
from voltage_ray.backends.grammar import Constraint, Grammars
from voltage_ray.backends.sampler import RowSampling, _sample_row, row_sampling, sample

CACHE = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)


def row(seed: int | None = 0, grammars: Grammars | None = None, **kw: Any) -> RowSampling:
    kw.setdefault("seed", seed)
    return row_sampling(prepared(**kw), 0, grammars)


def tokens(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    return sample(logits, rows)[0]


def test_greedy_rows_take_the_argmax_and_penalties_count_generated_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    rows = [row(temperature=0.0), row(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.2)]
    assert tokens(logits, rows) == [1, 1]  # nothing generated yet: no penalty
    assert rows[1].counts == {1: 1}
    assert tokens(logits, rows) == [1, 2]  # 3.0 - 0.4 - 0.2 < 2.5
    assert rows[0].counts is None  # rows without penalties count nothing


def test_top_p_keeps_the_nucleus_and_falls_back_to_a_full_sort() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # token 0 holds ~95% of the mass
    for seed in range(20):
        assert tokens(logits, [row(seed, top_p=0.5)]) == [0]
    # A flat 1000-token vocabulary: ties keep vocabulary order, the nucleus is the first 900.
    flat = torch.zeros(1, 1000)
    picks = {tokens(flat, [row(s, top_p=0.9)])[0] for s in range(40)}
    assert len(picks) > 20 and max(picks) < 900


def test_sampling_follows_the_distribution_whether_or_not_the_head_covers_top_p() -> None:
    """Three likely tokens over a tail of 49k unlikely ones (together 45% of the mass, each
    below the candidates' share): draws follow the nucleus' probabilities when the head covers
    top_p (0.45), when the tail must be sorted into the nucleus (0.6), and at top_p 1."""
    vocab, head = 49_152, [7, 3, 11]
    logits = torch.full((1, vocab), -5.6)
    logits[0, head] = torch.tensor([5.0, 4.0, 3.0])
    probs = torch.softmax(logits[0].double(), dim=0)
    order = torch.argsort(probs, descending=True, stable=True)  # ties: vocabulary order
    draws = 2000
    for top_p in (0.45, 0.6, 1.0):
        picks = torch.tensor([tokens(logits, [row(s, top_p=top_p)])[0] for s in range(draws)])
        kept = int(((torch.cumsum(probs[order], 0) - probs[order]) < top_p).sum())
        nucleus = order[:kept]
        assert set(picks.tolist()) <= set(order[: kept + 2].tolist())  # float32's edge
        expected = probs[nucleus] / probs[nucleus].sum()
        shares = [*expected[: min(3, kept)].tolist(), float(expected[min(3, kept) :].sum())]
        groups = [[t] for t in head[: min(3, kept)]] + [[t for t in range(vocab) if t not in head]]
        for share, group in zip(shares, groups, strict=True):
            seen = float(torch.isin(picks, torch.tensor(group)).double().mean())
            assert abs(seen - share) <= 4 * math.sqrt(share * (1 - share) / draws) + 1e-3


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = tokens(logits[1:2], [row(7, temperature=0.8, top_p=0.9)])
    batch = [row(1, temperature=1.0), row(7, temperature=0.8, top_p=0.9), row(temperature=0.0)]
    assert tokens(logits, batch)[1] == alone[0]


def test_logit_bias_bans_and_forces_tokens_per_row() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]] * 3)
    rows = [
        row(temperature=0.0),
        row(temperature=0.0, logit_bias={1: -100.0}),  # the argmax banned: the next best
        row(temperature=0.0, logit_bias={3: 100.0}),  # a token forced
    ]
    assert tokens(logits, rows) == [1, 2, 3]
    for seed in range(10):  # sampled rows obey the bias too
        forced = row(seed, temperature=1.0, logit_bias={0: 100.0})
        assert tokens(logits[:1], [forced]) == [0]
    assert logits[0, 1] == 5.0  # the caller's logits are left as they were


def test_logprobs_are_the_models_distribution_with_the_top_alternatives() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [2.0, 1.0, 0.5, -1.0]])
    rows = [
        row(temperature=0.0, logprobs=3),
        row(temperature=0.0, logprobs=0, logit_bias={3: 100.0}, frequency_penalty=1.0),
    ]
    picked, scored = sample(logits, rows)
    expected = torch.log_softmax(logits[0], dim=-1)
    first, second = scored
    assert first is not None and second is not None
    assert first.token == 0 == int(picked[0]) and first.top[0][0] == 0  # greedy is the top-1
    assert [t for t, _ in first.top] == [0, 1, 2]
    assert math.isclose(first.logprob, float(expected[0]), rel_tol=1e-5)
    assert all(lp <= 0 for _, lp in first.top)
    # The bias forced token 3; its logprob is the model's own, before bias and penalties.
    assert second.token == 3 and second.top == []
    assert math.isclose(second.logprob, float(expected[3]), rel_tol=1e-5)


def test_rows_without_logprobs_get_none() -> None:
    rows = [row(temperature=0.0), row(temperature=0.5)]
    _, scored = sample(torch.zeros(2, 4), rows)
    assert scored == [None, None]


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource

    tok = AutoTokenizer.from_pretrained(materialize(BuiltinSource(builtin="tiny-llama"), CACHE))
    return Grammars(tok, len(tok), frozenset({tok.eos_token_id}))


def test_a_constrained_row_only_takes_allowed_tokens_and_leaves_the_others_alone(
    grammars: Grammars,
) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x"]}},
        "required": ["a"],
        "additionalProperties": False,  # one text: the grammar decides every token
    }
    constraint = Constraint.of("json_schema", schema, "response_format")
    torch.manual_seed(1)
    vocab = grammars.vocab_size
    free = [row(temperature=0.0), row(5, temperature=1.0)]
    steps = [torch.randn(3, vocab) for _ in range(12)]
    alone = [tokens(s[[0, 2]], free) for s in steps]
    free = [row(temperature=0.0), row(5, temperature=1.0)]
    constrained = row(3, grammars, temperature=1.0, constraint=constraint, logprobs=2)
    text = b""
    for step, expected in zip(steps, alone, strict=True):
        picked, scored = sample(step, [free[0], constrained, free[1]])
        assert [int(picked[0]), int(picked[2])] == expected  # unconstrained rows: untouched
        token = int(picked[1])
        lp = scored[1]
        assert lp is not None and lp.logprob > -9999 and lp.top[0][1] >= lp.logprob
        if token in grammars.eos_ids:
            break
        text += grammars.token_bytes(token)
    assert text == b'{"a": "x"}'
    assert constrained.grammar is not None and constrained.grammar.done


def test_a_tiny_temperature_is_the_argmax_and_masked_rows_with_top_p_1_stay_in_bounds() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.99, -1.0]])
    for temperature in (1e-30, 1e-7):
        assert {tokens(logits, [row(s, temperature=temperature)])[0] for s in range(20)} == {1}
    # Only two tokens have mass (a grammar's mask): every draw lands on one of them, even one
    # that rounding carries past the candidates' cumulative mass (u = 1).
    two = torch.full((1, 50), -math.inf)
    two[0, [4, 9]] = torch.tensor([1.0, 1.0])
    assert {tokens(two, [row(s, temperature=1.0)])[0] for s in range(200)} == {4, 9}
    assert _sample_row(two[0].numpy(), 1.0, 1.0, 1.0) in (4, 9)
    assert _sample_row(two[0].numpy(), 1.0, 0.5, 1.0) == 4  # the nucleus: the first of the tie
