"""deployments/stream_batches.py: a stream's chunks in lists, the first at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from voltage_ray.deployments.stream_batches import in_batches


async def timed(schedule: list[tuple[float, str]], closed: list[bool]) -> AsyncIterator[str]:
    """Yield each item after its delay (0: in the same step as the one before it)."""
    try:
        for delay, item in schedule:
            if delay:
                await asyncio.sleep(delay)
            if item == "boom":
                raise ValueError("boom")
            yield item
    finally:
        closed.append(True)


async def collect(source: AsyncIterator[str], interval: float) -> list[tuple[float, list[str]]]:
    start = time.monotonic()
    return [(time.monotonic() - start, b) async for b in in_batches(source, interval)]


async def test_first_chunk_and_what_is_ready_with_it_go_at_once() -> None:
    closed: list[bool] = []
    # role chunk and first token together, then a token every 10 ms, then a pause, then the end
    schedule = [(0.02, "role"), (0, "t1"), *[(0.01, f"t{i}") for i in range(2, 9)]]
    schedule += [(0.3, "late"), (0, "usage")]
    out = await collect(timed(schedule, closed), 0.05)
    assert [x for _, b in out for x in b] == [item for _, item in schedule]  # nothing lost
    assert out[0][1] == ["role", "t1"] and out[0][0] < 0.05  # not held for the interval
    assert len(out) <= 5  # seven 10 ms tokens in 50 ms lists, not seven items
    late = next(t for t, b in out if "late" in b)
    assert out[-1][1] == ["late", "usage"] and late - out[-2][0] >= 0.25  # a slow one: at once
    assert closed == [True]


async def test_an_error_comes_after_the_items_before_it() -> None:
    closed: list[bool] = []
    gen = in_batches(timed([(0, "a"), (0.01, "b"), (0.01, "boom")], closed), 0.05)
    got: list[str] = []
    with pytest.raises(ValueError, match="boom"):
        async for batch in gen:
            got += batch
    assert got == ["a", "b"] and closed == [True]


async def test_closing_early_closes_the_source() -> None:
    closed: list[bool] = []
    gen = in_batches(timed([(0.01, f"t{i}") for i in range(100)], closed), 0.05)
    assert await anext(gen) == ["t0"]
    await gen.aclose()
    assert closed == [True]
