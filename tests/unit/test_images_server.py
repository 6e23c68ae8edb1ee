"""GroupLoop: one pipeline call at a time over the next group of compatible waiting jobs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from voltage_ray.backends.images import Bucket, Job
from voltage_ray.deployments.images import GroupLoop, ImageStats, Outcome

A = Bucket(256, 256, 10, 7.5)
B = Bucket(512, 512, 10, 7.5)


class FakeRun:
    """Stands in for ImageEngine.run: records each call; the first may block until released."""

    def __init__(self, block_first: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        if not block_first:
            self.release.set()

    def __call__(self, jobs: Sequence[Job]) -> list[Outcome]:
        self.calls.append([job.prompt for job in jobs])
        self.release.wait(10)
        return [[job.prompt.encode()] * job.n for job in jobs]


def job(prompt: str, bucket: Bucket = A, n: int = 1) -> Job:
    return Job(prompt, bucket, list(range(n)))


async def test_jobs_enqueued_together_share_one_call() -> None:
    run = FakeRun()
    loop = GroupLoop(run, 10**9, ImageStats())
    results = await asyncio.gather(*(loop.enqueue(job(p, n=2)) for p in "abc"))
    assert run.calls == [["a", "b", "c"]]
    assert results == [[b"a", b"a"], [b"b", b"b"], [b"c", b"c"]]


async def test_jobs_waiting_during_a_call_merge_by_bucket_in_arrival_order() -> None:
    run = FakeRun(block_first=True)
    stats = ImageStats()
    loop = GroupLoop(run, 10**9, stats)
    first = loop.enqueue(job("a0"))
    await asyncio.sleep(0.05)  # the first call is running (blocked)
    waiting = [loop.enqueue(job("b0", B)), loop.enqueue(job("a1")), loop.enqueue(job("a2"))]
    run.release.set()
    await asyncio.gather(first, *waiting)
    assert run.calls == [["a0"], ["b0"], ["a1", "a2"]]
    assert stats.calls == 3 and stats.images == 4
    assert [c["requests"] for c in stats.recent] == [1, 1, 2]
    assert stats.recent[1]["size"] == "512x512"


async def test_a_job_cancelled_while_waiting_never_runs() -> None:
    run = FakeRun(block_first=True)
    loop = GroupLoop(run, 10**9, ImageStats())
    first = loop.enqueue(job("a0"))
    await asyncio.sleep(0.05)
    gone, kept = job("a1"), job("a2")
    gone_future, kept_future = loop.enqueue(gone), loop.enqueue(kept)
    gone.cancel.set()
    run.release.set()
    assert await kept_future == [b"a2"]
    assert await gone_future is None
    await first
    assert run.calls == [["a0"], ["a2"]]


async def test_a_failed_call_fails_its_jobs_only() -> None:
    def run(jobs: Sequence[Job]) -> list[Outcome]:
        if jobs[0].prompt == "bad":
            raise RuntimeError("out of memory")
        return [[b"ok"] for _ in jobs]

    loop = GroupLoop(run, 10**9, ImageStats())
    bad, good = loop.enqueue(job("bad")), loop.enqueue(job("good", B))
    with pytest.raises(RuntimeError, match="out of memory"):
        await bad
    assert await good == [b"ok"]


async def test_pixel_cap_splits_a_bucket_into_calls() -> None:
    run = FakeRun()
    loop = GroupLoop(run, 2 * 256 * 256, ImageStats())
    await asyncio.gather(*(loop.enqueue(job(p)) for p in "abcde"))
    assert run.calls == [["a", "b"], ["c", "d"], ["e"]]


async def test_interrupted_calls_are_counted() -> None:
    stats = ImageStats()
    loop = GroupLoop(lambda jobs: [None for _ in jobs], 10**9, stats)
    assert await loop.enqueue(job("a")) is None
    assert stats.interrupted_calls == 1 and stats.images == 0


async def test_running_and_waiting_are_reported() -> None:
    run = FakeRun(block_first=True)
    loop = GroupLoop(run, 10**9, ImageStats())
    assert (loop.running, loop.waiting) == (None, 0)
    first = loop.enqueue(job("a0", n=3))
    await asyncio.sleep(0.05)
    gone, kept = job("b0", B), job("b1", B)
    futures = [loop.enqueue(gone), loop.enqueue(kept)]
    gone.cancel.set()
    assert loop.running == {
        "size": "256x256",
        "steps": 10,
        "guidance": 7.5,
        "requests": 1,
        "images": 3,
    }
    assert loop.waiting == 1
    run.release.set()
    await asyncio.gather(first, *futures)
    assert (loop.running, loop.waiting) == (None, 0)
