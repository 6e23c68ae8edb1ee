"""The batch scheduler in-process on the tiny model (no Ray): sampling, merging, eviction."""

from __future__ import annotations

import os
import queue
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.chat_requests import prepared
from voltage_ray.backends.batching import BatchScheduler, Finished, Ticket, _Row, row_seed, sample
from voltage_ray.backends.chat import ChatEngine, Prepared, RowDecoder
from voltage_ray.protocol.chat import ChatCompletionRequest

CACHE = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)


def row(seed: int | None = 0, **kw: Any) -> _Row:
    p = prepared(**kw)
    gen = None
    if p.temperature > 0:
        gen = torch.Generator().manual_seed(row_seed(seed or 0, 0))
    return _Row(Ticket(p, lambda _: None), 0, RowDecoder(str, [], 4, frozenset()), gen)


def test_greedy_rows_take_the_argmax_and_penalties_count_generated_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    counts = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    rows = [row(temperature=0.0), row(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.2)]
    assert sample(logits, rows, counts).tolist() == [1, 2]  # 3.0 - 0.4 - 0.2 < 2.5


def test_top_p_keeps_the_nucleus_and_falls_back_to_a_full_sort() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # token 0 holds ~95% of the mass
    counts = torch.zeros(1, 4)
    for seed in range(20):
        assert sample(logits, [row(seed, top_p=0.5)], counts).item() == 0
    # A flat 1000-token vocabulary: the top-256 prefix holds ~26% < top_p, so all is sorted.
    flat = torch.zeros(1, 1000)
    picks = {int(sample(flat, [row(s, top_p=0.9)], torch.zeros(1, 1000))) for s in range(40)}
    assert len(picks) > 20 and max(picks) < 1000


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    counts = torch.zeros(3, 50)
    alone = sample(logits[1:2], [row(7, temperature=0.8, top_p=0.9)], counts[1:2])
    batch = [row(1, temperature=1.0), row(7, temperature=0.8, top_p=0.9), row(temperature=0.0)]
    assert sample(logits, batch, counts)[1] == alone[0]


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource, ChatSettings

    location = materialize(BuiltinSource(builtin="tiny-llama"), CACHE)
    return ChatEngine(location, ChatSettings(max_context=512))


@pytest.fixture()
def scheduler(engine: ChatEngine) -> Iterator[BatchScheduler]:
    s = BatchScheduler(
        engine.model, engine.decode, engine.eos_ids, max_num_seqs=4, max_prefill_tokens=32
    )
    yield s
    s.shutdown()


def request(engine: ChatEngine, text: str, **kw: Any) -> Prepared:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **kw}
    return engine.prepare(ChatCompletionRequest.model_validate(body))


def run(s: BatchScheduler, jobs: list[Prepared]) -> list[tuple[list[str], list[int]]]:
    """Submit all jobs at once; each job's texts per choice and tokens per choice."""
    sinks: list[queue.Queue[Any]] = [queue.Queue() for _ in jobs]
    for job, q in zip(jobs, sinks, strict=True):
        s.submit(job, q.put)
    out = []
    for job, q in zip(jobs, sinks, strict=True):
        texts = [""] * job.n
        while not isinstance(item := q.get(timeout=60), Finished):
            assert not isinstance(item, BaseException), item
            for ev in item:
                texts[ev.index] += ev.text
        out.append((texts, item.tokens))
    return out


def test_seeded_requests_match_alone_and_batched_with_n_and_chunked_prompts(
    engine: ChatEngine, scheduler: BatchScheduler
) -> None:
    kw = dict(temperature=0.9, top_p=0.95, presence_penalty=0.3, frequency_penalty=0.2)
    jobs = [
        request(engine, "a fox " * (i * 9 + 1), max_tokens=6 + 3 * i, seed=i, n=1 + i % 2, **kw)
        for i in range(4)
    ]
    alone = [run(scheduler, [j])[0] for j in jobs]
    together = run(scheduler, jobs)
    assert together == alone
    for (_, used), job in zip(together, jobs, strict=True):
        assert len(used) == job.n and all(0 < t <= job.max_tokens for t in used)
    stats = scheduler.stats()
    assert max(stats["batch_sizes"]) > 1 and max(stats["batch_sizes"]) <= 4
    assert 0 < stats["max_prefill_chunk_tokens"] <= 32  # the long prompts went in chunks
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_cancelled_rows_leave_at_the_next_step(
    engine: ChatEngine, scheduler: BatchScheduler
) -> None:
    got: list[queue.Queue[Any]] = [queue.Queue() for _ in range(4)]
    tickets = [
        scheduler.submit(request(engine, "story", max_tokens=400, temperature=0), q.put)
        for q in got
    ]
    for q in got:
        q.get(timeout=60)  # every request is decoding
    for t in tickets[:2]:
        scheduler.cancel(t)
    for q in got[2:]:
        while not isinstance(q.get(timeout=60), Finished):
            pass
    stats = scheduler.stats()
    assert stats["evicted_cancelled"] == 2 and stats["max_eviction_lag_steps"] <= 1
    assert stats["running"] == 0
