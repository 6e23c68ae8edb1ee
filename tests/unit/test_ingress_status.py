"""The ingress's view of Serve's state (/health, routability, the queue bound): refreshed by a
background task, never on a request's path while it is fresh."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from voltage_ray.ingress import served_models
from voltage_ray.ingress.served_models import Models

VIEW = {"m": (True, 1)}


def bare_ingress(reads: list[float]) -> Any:
    """Models with only its status fields; ``_read_status`` records when it runs."""
    ingress: Any = object.__new__(Models)
    ingress._status_cache = ingress._status_refresh = ingress._status_watch = None
    ingress._status_forgotten = 0.0

    async def read() -> dict[str, tuple[bool, int]]:
        started = time.monotonic()
        reads.append(started)
        await asyncio.sleep(0.01)  # a controller round trip
        if started >= ingress._status_forgotten:
            ingress._status_cache = (time.monotonic(), VIEW)
        return VIEW

    ingress._read_status = read
    return ingress


async def test_the_view_is_refreshed_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(served_models, "STATUS_REFRESH_S", 0.05)
    reads: list[float] = []
    ingress = bare_ingress(reads)
    try:
        assert await ingress._status() == VIEW  # no view yet: the first caller waits for one
        first = len(reads)
        assert first == 1
        for _ in range(20):  # fresh: answered from the view, no read on the path
            assert await ingress._status() == VIEW
        assert len(reads) == first
        await asyncio.sleep(0.3)
        assert len(reads) >= 3  # the background task keeps reading
        ingress.forget_readiness()  # after a replica failed: the next caller reads again
        before = len(reads)
        assert await ingress._status() == VIEW and len(reads) == before + 1
    finally:
        ingress._status_watch.cancel()
