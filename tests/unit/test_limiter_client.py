"""The ingress side of the limiter: coalesced exchanges, settlement delivery, cancellation.

The limiter here is the real class called in-process through an adapter with Ray's calling
shape (``handle.method.remote(...)`` returns an awaitable); the integration tests cover Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.errors import RateLimited, ServiceUnavailable
from voltage_ray.limits.client import LimiterClient, placement
from voltage_ray.limits.keyring import KeyRing
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.limiter import Limiter

PLANS = "plans:\n  five: {requests_per_minute: 5}\n  tokens: {tokens_per_month: 100}\n"


class Method:
    def __init__(self, fn: Callable[..., Awaitable[Any]], calls: list[str], name: str) -> None:
        self.fn, self.calls, self.name = fn, calls, name

    def remote(self, *args: Any) -> Awaitable[Any]:
        self.calls.append(self.name)
        return self.fn(*args)


class InProcess:
    """A Limiter behind Ray's calling shape; records which methods were called."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.calls: list[str] = []
        self.down = False

    def __getattr__(self, name: str) -> Method:
        async def call(*args: Any) -> Any:
            if self.down:
                raise asyncio.TimeoutError  # what an unreachable actor looks like to the client
            return await getattr(self.limiter, name)(*args)

        return Method(call, self.calls, name)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[InProcess, str, str]:
    (tmp_path / "p.yaml").write_text(PLANS)
    store = KeyStore(tmp_path / "v.db")
    five, tokens = store.create("five")[0].id, store.create("tokens")[0].id
    store.close()
    return InProcess(Limiter(str(tmp_path / "v.db"), str(tmp_path / "p.yaml"))), five, tokens


async def test_concurrent_admissions_share_round_trips(setup: tuple[InProcess, str, str]) -> None:
    actor, five, _ = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    results = await asyncio.gather(
        *(client.admit(five, (), 0, 0) for _ in range(40)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert sum(isinstance(r, RateLimited) for r in results) == 35
    assert actor.calls.count("exchange") < 40  # coalesced


async def test_settlements_are_delivered_and_release_quota(
    setup: tuple[InProcess, str, str],
) -> None:
    actor, _, key = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    grants = [await client.admit(key, (), 50, 0) for _ in range(2)]
    with pytest.raises(Exception, match="Quota exceeded"):
        await client.admit(key, (), 1, 0)
    for g in grants:
        client.settle(g, 10, 0)
    await client.drain()
    report = await actor.limiter.usage(key)
    assert report is not None and report["limits"]["tokens"]["used"] == 20
    assert report["limits"]["tokens"]["reserved"] == 0


async def test_unavailable_limiter_is_a_503_and_settlements_wait(
    setup: tuple[InProcess, str, str],
) -> None:
    actor, _, key = setup
    client = LimiterClient(lambda: actor, timeout_s=0.2)
    grant = await client.admit(key, (), 30, 0)
    actor.down = True
    with pytest.raises(ServiceUnavailable):
        await client.admit(key, (), 1, 0)
    delivered = client.settle(grant, 7, 0)
    await asyncio.sleep(0.3)  # delivery fails and is retried
    assert not delivered.done()  # an answer waiting for it would still be waiting
    actor.down = False
    assert await asyncio.wait_for(delivered, 5)
    report = await actor.limiter.usage(key)
    assert report is not None
    assert report["limits"]["tokens"] == {"used": 7, "reserved": 0, "limit": 100}


async def test_an_abandoned_admission_is_released(setup: tuple[InProcess, str, str]) -> None:
    actor, _, key = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    waiting = asyncio.ensure_future(client.admit(key, (), 60, 0))
    await asyncio.sleep(0)  # queued, not yet answered
    waiting.cancel()
    await asyncio.sleep(0.1)
    await client.drain()
    report = await actor.limiter.usage(key)
    assert report is not None
    assert report["limits"]["tokens"]["reserved"] == 0
    assert report["limits"]["requests"]["used"] == 0  # admitted then voided, or never
    assert await client.admit(key, (), 100, 0)  # the whole quota is free again


async def test_a_settlement_is_acknowledged_once_the_limiter_has_it(
    setup: tuple[InProcess, str, str],
) -> None:
    actor, _, key = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    grant = await client.admit(key, (), 50, 0)
    delivered = client.settle(grant, 12, 0)
    assert await asyncio.wait_for(delivered, 5) is True
    report = await actor.limiter.usage(key)  # no drain needed: it is there
    assert report is not None and report["limits"]["tokens"]["used"] == 12


async def test_admissions_are_recorded_as_the_replicas_own(
    setup: tuple[InProcess, str, str],
) -> None:
    actor, _, key = setup
    handle = object()
    owner = ("replica-1", handle, "serve/replica-1")
    client = LimiterClient(lambda: actor, timeout_s=5, owner=owner)
    grants = [await client.admit(key, (), 10, 0) for _ in range(3)]
    await asyncio.sleep(0.05)  # the registration rides on the first exchange
    assert actor.calls.count("register") == 1
    assert actor.limiter.owners.handles == {"replica-1": handle}
    assert actor.limiter.owners.tickets["replica-1"] == {(g.epoch, g.ticket) for g in grants}
    assert actor.limiter.owners.names["replica-1"] == "serve/replica-1"


async def test_a_new_incarnation_voids_the_restored_holds_its_replica_does_not_name(
    setup: tuple[InProcess, str, str], tmp_path: Path
) -> None:
    """An admission committed by a limiter that died before its answer reached the replica:
    the replica never knew it. When the replica registers with the new incarnation it names
    the holds it has; the others of its own are voided, the ones it names settle as usual."""
    actor, _, key = setup
    owner = ("replica-1", object(), "")
    client = LimiterClient(lambda: actor, timeout_s=5, owner=owner)
    known = await client.admit(key, (), 10, 0)
    lost = await actor.limiter.admit(key, (), 20, 0, None, "replica-1")  # its answer is lost
    assert not isinstance(lost, BaseException)
    # The limiter dies; a new incarnation restores both holds from the database.
    actor.limiter = Limiter(str(tmp_path / "v.db"), str(tmp_path / "p.yaml"))
    assert len(actor.limiter.holds) == 2
    await client.admit(key, (), 1, 0)  # meets the new epoch, registers naming `known`
    await asyncio.sleep(0.05)
    assert set(actor.limiter.holds) == {
        (known.epoch, known.ticket),
        *((g, t) for g, t in actor.limiter.holds if g == actor.limiter.epoch),
    }
    assert actor.limiter.voided == 1
    await asyncio.wait_for(client.settle(known, 7, 0), 5)
    report = await actor.limiter.usage(key)
    assert report is not None
    assert report["limits"]["tokens"]["used"] == 7  # the lost admission is billed nothing
    assert report["limits"]["requests"]["used"] == 2  # and not counted


async def test_the_key_ring_follows_the_store(
    setup: tuple[InProcess, str, str], tmp_path: Path
) -> None:
    actor, _, _ = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    ring = KeyRing()
    await client.sync_keys(ring)
    store = KeyStore(tmp_path / "v.db")
    _, key = store.create("five")
    store.close()
    assert ring.verify(key) == (None, "unknown")
    following = asyncio.ensure_future(client.follow_keys(ring, every_s=0.01))
    try:
        for _ in range(100):
            if ring.verify(key)[0] is not None:
                break
            await asyncio.sleep(0.01)
        assert ring.verify(key)[0] is not None
        assert actor.calls.count("exchange") == 0  # keys only: no admission, no settlement
    finally:
        following.cancel()


def test_the_limiter_is_pinned_to_the_database_node() -> None:
    # A hard resource requirement: the head node unless a custom resource names another node.
    assert placement(None) == {"resources": {"node:__internal_head__": 0.001}}
    assert placement("voltage_db") == {"resources": {"voltage_db": 0.001}}


async def test_a_failed_exchange_answers_its_admissions_and_the_next_one_works(
    setup: tuple[InProcess, str, str],
) -> None:
    """Not only an unreachable limiter: any error of the call (Ray's TaskCancelledError when
    a request's calls were cancelled) answers the admissions it carried with a 503, and the
    client goes on."""
    actor, five, _ = setup
    client = LimiterClient(lambda: actor, timeout_s=5)
    real = actor.limiter.exchange
    failures = [RuntimeError("cancelled")]

    async def exchange(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args)

    actor.limiter.exchange = exchange  # type: ignore[method-assign]
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(client.admit(five, (), 0, 0), 5)
    grant = await asyncio.wait_for(client.admit(five, (), 0, 0), 5)
    assert await client.settle(grant, 0, 0)


async def test_the_clients_calls_do_not_run_in_the_context_of_the_request_that_started_them(
    setup: tuple[InProcess, str, str],
) -> None:
    """In an async actor Ray's current task is a context variable: a call made in a request's
    context is that request's child, cancelled with it. The exchange loop, started by whichever
    request came first, runs in a context of its own."""
    import contextvars

    actor, five, _ = setup
    request = contextvars.ContextVar("request", default="none")
    seen: list[str] = []
    real = actor.limiter.exchange

    async def exchange(*args: Any) -> Any:
        seen.append(request.get())
        return await real(*args)

    actor.limiter.exchange = exchange  # type: ignore[method-assign]
    client = LimiterClient(lambda: actor, timeout_s=5)

    async def first_request() -> None:
        request.set("first")
        await client.admit(five, (), 0, 0)

    await asyncio.create_task(first_request())
    await client.admit(five, (), 0, 0)
    assert seen == ["none", "none"]
