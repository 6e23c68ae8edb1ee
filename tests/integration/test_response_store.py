"""Stored responses through the real limiter actor, as an ingress replica reaches them: the
client's ``responses`` calls on a local Ray cluster, on both databases, and what was stored
outlives the actor (Ray's kill, then its restart)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from voltage_ray.errors import ServiceUnavailable
from voltage_ray.limits.client import LimiterClient, get_or_create_limiter
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.responses import StoredResponse


async def when_back(call: Callable[[], Awaitable[Any]], timeout_s: float = 60) -> Any:
    """``call()`` once the limiter answers again (a 503 meanwhile, as an ingress sees)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.timeout(300)
async def test_stored_responses_through_the_limiter_actor(
    ray_cluster: None, tmp_path: Path, database: str
) -> None:
    (tmp_path / "plans.yaml").write_text("plans:\n  open: {}\n")
    store = KeyStore(database)
    owner = store.create("open")[0].id  # a key exists: the limiter makes no bootstrap key
    store.close()
    name = f"voltage_ray_limiter_responses_{uuid.uuid4().hex[:8]}"
    actor = get_or_create_limiter(database, str(tmp_path / "plans.yaml"), None, None, name)
    client = LimiterClient(lambda: actor, timeout_s=60)
    now = time.time()
    stored = StoredResponse(
        id="resp_abc",
        owner=owner,
        model="smol",
        status="completed",
        response={"id": "resp_abc", "object": "response", "status": "completed"},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}],
        conversation=[{"type": "message", "role": "user", "content": "hi" * 50_000}],
        created_at=now,
        expires_at=now + 3600,
    )
    try:
        await client.responses.put(stored)
        assert await client.responses.get("resp_abc", owner) == stored
        assert await client.responses.get("resp_abc", "someone_else") is None
        assert await client.responses.delete("resp_abc", "someone_else") is False
        epoch = (await client.call("info"))["epoch"]
        ray.kill(actor, no_restart=False)  # Ray restarts it; what was acknowledged is on disk
        while (await when_back(lambda: client.call("info")))["epoch"] == epoch:
            await asyncio.sleep(0.2)  # the kill has not reached it yet
        assert await client.responses.get("resp_abc", owner) == stored
        assert await client.responses.delete("resp_abc", owner) is True
        assert await client.responses.get("resp_abc", owner) is None
        assert await client.responses.delete("resp_abc", owner) is False
    finally:
        ray.kill(actor, no_restart=True)
