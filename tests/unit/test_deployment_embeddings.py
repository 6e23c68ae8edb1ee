"""The EmbeddingServer's pure parts: the encode loop that merges batches (fairly between API
keys, within a bound on the requests waiting), and batch stats."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voltage_ray.backends.fairness import Tenant
from voltage_ray.deployments.embeddings import BatchStats, EncodeLoop
from voltage_ray.errors import Overloaded

ANY = Tenant("k")


def put(loop: EncodeLoop, texts: list[str], tenant: Tenant = ANY) -> asyncio.Future[np.ndarray]:
    """One request's inputs: a place, then its chunk."""
    return loop.enqueue(texts, loop.admit(tenant))


class SlowEncoder:
    """Encodes text ``t`` as ``[len(t)]``; waits until released, recording batch contents."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        await asyncio.wait_for(self.release.wait(), 5)
        if self.fail:
            raise RuntimeError("boom")
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)


async def test_chunks_waiting_behind_an_encode_are_merged_in_order() -> None:
    enc = SlowEncoder()
    sizes: list[int] = []
    loop = EncodeLoop(enc, max_batch_size=5, on_batch=sizes.append)
    first = put(loop, ["a"])
    await asyncio.sleep(0.05)  # the first encode is now running (and blocked)
    waiting = [put(loop, ["bb", "ccc"]), put(loop, ["dddd"]), put(loop, ["e" * 5] * 3)]
    enc.release.set()
    results = await asyncio.gather(first, *waiting)
    # The three chunks that waited (2 + 1 + 3 inputs) fill batches of at most 5, in order.
    assert enc.calls == [["a"], ["bb", "ccc", "dddd"], ["eeeee"] * 3]
    assert sizes == [1, 3, 3]
    assert [r[:, 0].tolist() for r in results] == [[1.0], [2.0, 3.0], [4.0], [5.0] * 3]


async def test_a_full_batch_is_sent_ahead_a_partial_one_waits() -> None:
    enc = SlowEncoder()
    loop = EncodeLoop(enc, max_batch_size=2, on_batch=lambda n: None)
    first = put(loop, ["a"])
    await asyncio.sleep(0.05)
    partial = put(loop, ["b"])
    await asyncio.sleep(0.05)
    assert enc.calls == [["a"]]  # one input waits: it gathers company while "a" runs
    full = put(loop, ["c"])
    await asyncio.sleep(0.05)
    assert enc.calls == [["a"], ["b", "c"]]  # a full batch goes ahead: two in flight
    third = put(loop, ["d", "e"])
    await asyncio.sleep(0.05)
    assert len(enc.calls) == 2  # never more than two
    enc.release.set()
    await asyncio.gather(first, partial, full, third)
    assert enc.calls[-1] == ["d", "e"] and loop.busy_s > 0.1


async def test_an_encode_error_reaches_every_chunk_of_its_batch() -> None:
    enc = SlowEncoder()
    enc.fail = True
    loop = EncodeLoop(enc, max_batch_size=8, on_batch=lambda n: None)
    futures = [put(loop, ["x"]), put(loop, ["y", "z"])]
    enc.release.set()
    for outcome in await asyncio.gather(*futures, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)
    enc.fail = False
    ok = await put(loop, ["after"])  # the loop survives a failed batch
    assert ok.tolist() == [[5.0]]


async def test_max_batch_size_is_read_per_batch() -> None:
    enc = SlowEncoder()
    enc.release.set()
    loop = EncodeLoop(enc, max_batch_size=2, on_batch=lambda n: None)
    loop.max_batch_size = 1
    await asyncio.gather(*(put(loop, [t]) for t in "abc"))
    assert all(len(call) == 1 for call in enc.calls)


def test_batch_stats_summary() -> None:
    stats = BatchStats("m")
    for size in (1, 4, 4, 32):
        stats.record(size)
    summary = stats.summary()
    assert summary["batches"] == 4 and summary["inputs"] == 41
    assert summary["sizes"] == {"1": 1, "4": 2, "32": 1}
    assert summary["recent_mean"] == pytest.approx(41 / 4) and summary["recent_max"] == 32


async def test_a_key_with_one_input_goes_before_another_keys_backlog() -> None:
    enc = SlowEncoder()
    loop = EncodeLoop(enc, max_batch_size=4, on_batch=lambda n: None)
    heavy, light = Tenant("heavy"), Tenant("light")
    first = put(loop, ["h0"], heavy)
    await asyncio.sleep(0.05)  # heavy's first batch is encoding (and blocked)
    backlog = [put(loop, [f"h{i}"] * 4, heavy) for i in range(1, 4)]
    mine = put(loop, ["l"], light)  # arrives last
    enc.release.set()
    await asyncio.gather(first, mine, *backlog)
    # The next batch holds the light key's input, then the heavy key's (fair order, not
    # arrival order); the light key never waited for the heavy key's backlog.
    assert enc.calls[1][0] == "l"
    assert sum("l" in call for call in enc.calls) == 1


async def test_a_full_queue_sheds_the_heaviest_keys_newest_request_for_a_key_under_its_share() -> (
    None
):
    enc = SlowEncoder()
    loop = EncodeLoop(enc, max_batch_size=1, on_batch=lambda n: None, max_queued=3)
    heavy, light = Tenant("heavy"), Tenant("light")
    running = put(loop, ["a"], heavy)
    await asyncio.sleep(0.05)  # started: it no longer counts as waiting
    waiting = [put(loop, [t], heavy) for t in "bcd"]  # the queue is full
    with pytest.raises(Overloaded) as refused:
        loop.admit(heavy)  # heavy holds 4 places, its share is all of them: refused
    assert refused.value.details["reason"] == "refused"
    mine = put(loop, ["l"], light)  # light holds none: heavy's newest waiting request gives way
    enc.release.set()
    outcomes = await asyncio.gather(running, mine, *waiting, return_exceptions=True)
    assert isinstance(outcomes[-1], Overloaded) and outcomes[-1].details["reason"] == "shed"
    assert all(isinstance(o, np.ndarray) for o in outcomes[:-1])
    assert loop.places.shed == 1 and loop.places.refused == 1


async def test_a_higher_priority_newcomer_displaces_a_lower_priority_waiting_request() -> None:
    enc = SlowEncoder()
    loop = EncodeLoop(enc, max_batch_size=1, on_batch=lambda n: None, max_queued=1)
    first = put(loop, ["a"], Tenant("free"))
    await asyncio.sleep(0.05)
    low = put(loop, ["b"], Tenant("free"))
    high = put(loop, ["c"], Tenant("paid", priority=1))
    enc.release.set()
    outcomes = await asyncio.gather(first, low, high, return_exceptions=True)
    assert isinstance(outcomes[1], Overloaded)
    assert enc.calls == [["a"], ["c"]]
