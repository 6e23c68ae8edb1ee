"""The EmbeddingServer's pure parts: the encode loop that merges batches, and batch stats."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voltage_ray.deployments.embeddings import BatchStats, EncodeLoop


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
    first = loop.enqueue(["a"])
    await asyncio.sleep(0.05)  # the first encode is now running (and blocked)
    waiting = [loop.enqueue(["bb", "ccc"]), loop.enqueue(["dddd"]), loop.enqueue(["e" * 5] * 3)]
    enc.release.set()
    results = await asyncio.gather(first, *waiting)
    # The three chunks that waited (2 + 1 + 3 inputs) fill batches of at most 5, in order.
    assert enc.calls == [["a"], ["bb", "ccc", "dddd"], ["eeeee"] * 3]
    assert sizes == [1, 3, 3]
    assert [r[:, 0].tolist() for r in results] == [[1.0], [2.0, 3.0], [4.0], [5.0] * 3]


async def test_a_full_batch_is_sent_ahead_a_partial_one_waits() -> None:
    enc = SlowEncoder()
    loop = EncodeLoop(enc, max_batch_size=2, on_batch=lambda n: None)
    first = loop.enqueue(["a"])
    await asyncio.sleep(0.05)
    partial = loop.enqueue(["b"])
    await asyncio.sleep(0.05)
    assert enc.calls == [["a"]]  # one input waits: it gathers company while "a" runs
    full = loop.enqueue(["c"])
    await asyncio.sleep(0.05)
    assert enc.calls == [["a"], ["b", "c"]]  # a full batch goes ahead: two in flight
    third = loop.enqueue(["d", "e"])
    await asyncio.sleep(0.05)
    assert len(enc.calls) == 2  # never more than two
    enc.release.set()
    await asyncio.gather(first, partial, full, third)
    assert enc.calls[-1] == ["d", "e"] and loop.busy_s > 0.1


async def test_an_encode_error_reaches_every_chunk_of_its_batch() -> None:
    enc = SlowEncoder()
    enc.fail = True
    loop = EncodeLoop(enc, max_batch_size=8, on_batch=lambda n: None)
    futures = [loop.enqueue(["x"]), loop.enqueue(["y", "z"])]
    enc.release.set()
    for outcome in await asyncio.gather(*futures, return_exceptions=True):
        assert isinstance(outcome, RuntimeError)
    enc.fail = False
    ok = await loop.enqueue(["after"])  # the loop survives a failed batch
    assert ok.tolist() == [[5.0]]


async def test_max_batch_size_is_read_per_batch() -> None:
    enc = SlowEncoder()
    enc.release.set()
    loop = EncodeLoop(enc, max_batch_size=2, on_batch=lambda n: None)
    loop.max_batch_size = 1
    await asyncio.gather(*(loop.enqueue([t]) for t in "abc"))
    assert all(len(call) == 1 for call in enc.calls)


def test_batch_stats_summary() -> None:
    stats = BatchStats("m")
    for size in (1, 4, 4, 32):
        stats.record(size)
    summary = stats.summary()
    assert summary["batches"] == 4 and summary["inputs"] == 41
    assert summary["sizes"] == {"1": 1, "4": 2, "32": 1}
    assert summary["recent_mean"] == pytest.approx(41 / 4) and summary["recent_max"] == 32
