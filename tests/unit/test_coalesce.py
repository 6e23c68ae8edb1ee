"""The ingress's shared handle calls (pure asyncio: each call is a future the test answers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from voltage_ray.errors import BadRequest, ServiceUnavailable
from voltage_ray.ingress.coalesce import Coalescer


class FakeHandle:
    """Records each call's items; the test answers a call by resolving its future."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []

    def send(self, items: list[Any]) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.calls.append((list(items), future))
        return future

    def answer(self, index: int, fn: Any = lambda x: x * 10) -> None:
        items, future = self.calls[index]
        future.set_result([fn(x) for x in items])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_coalescer_sends_a_request_at_once_alone() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=2, max_wait_s=60, max_weight=100)
    task = asyncio.create_task(c.submit(1))
    await settle()
    assert [items for items, _ in handle.calls] == [[1]]
    handle.answer(0)
    assert await task == 10


async def test_requests_arriving_while_calls_are_busy_share_the_next_call() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    first = asyncio.create_task(c.submit(1))
    await settle()
    rest = [asyncio.create_task(c.submit(i)) for i in range(2, 6)]
    await settle()
    assert len(handle.calls) == 1  # all four wait for the one slot
    handle.answer(0)
    await settle()
    assert [items for items, _ in handle.calls] == [[1], [2, 3, 4, 5]]
    handle.answer(1)
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50]  # each gets its own result
    assert (c.calls, c.items) == (2, 5)


async def test_waiting_requests_leave_after_max_wait_even_while_calls_are_busy() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=0.05, max_weight=100)
    first = asyncio.create_task(c.submit(1))
    await settle()
    rest = [asyncio.create_task(c.submit(i)) for i in (2, 3)]
    await settle()
    assert len(handle.calls) == 1
    assert c.waiting == 2
    await asyncio.sleep(0.1)  # the first call is still busy: they go anyway, together
    assert [items for items, _ in handle.calls] == [[1], [2, 3]]
    assert c.waiting == 0
    handle.answer(1)
    assert await asyncio.gather(*rest) == [20, 30]
    handle.answer(0)
    assert await first == 10


async def test_max_weight_sends_at_once_and_a_heavy_item_goes_alone() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=10)
    blocker = asyncio.create_task(c.submit(0))
    await settle()
    light = [asyncio.create_task(c.submit(i, weight=4)) for i in (1, 2)]
    await settle()
    assert len(handle.calls) == 1  # 8 of 10: they wait
    heavy = asyncio.create_task(c.submit(3, weight=50))
    last = asyncio.create_task(c.submit(4, weight=1))
    await settle()
    # the heavy one tipped the scale: everything waiting left at once (while the blocker is still
    # busy), never above max_weight unless alone; the light one after it waits again
    assert [items for items, _ in handle.calls] == [[0], [1, 2], [3]]
    for i in range(3):
        handle.answer(i)
    await settle()
    assert [items for items, _ in handle.calls][3:] == [[4]]  # a slot freed: it left
    handle.answer(3)
    assert await asyncio.gather(blocker, *light, heavy, last) == [0, 10, 20, 30, 40]


def test_the_cap_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Coalescer(lambda items: None, max_in_flight=0, max_wait_s=0, max_weight=1)


async def test_an_error_for_one_request_fails_that_request_alone() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    blocker = asyncio.create_task(c.submit(0))
    await settle()
    good, bad = asyncio.create_task(c.submit(1)), asyncio.create_task(c.submit(2))
    await settle()
    handle.answer(0)
    await settle()
    handle.answer(1, lambda x: BadRequest("input too long") if x == 2 else x * 10)
    assert await good == 10
    with pytest.raises(BadRequest, match="input too long"):
        await bad
    assert await blocker == 0


async def test_a_failed_call_fails_each_of_its_requests() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    tasks = [asyncio.create_task(c.submit(i)) for i in range(3)]
    await settle()
    handle.calls[0][1].set_exception(ServiceUnavailable("replica died"))
    await settle()
    handle.answer(1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], ServiceUnavailable)
    assert results[1:] == [10, 20]  # the next call is unaffected


async def test_a_request_withdrawn_before_its_call_is_not_sent() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    blocker = asyncio.create_task(c.submit(0))
    await settle()
    leaving, staying = asyncio.create_task(c.submit(1)), asyncio.create_task(c.submit(2))
    await settle()
    leaving.cancel()
    handle.answer(0)
    await settle()
    assert [items for items, _ in handle.calls] == [[0], [2]]
    handle.answer(1)
    assert await staying == 20
    assert await blocker == 0


async def test_a_call_whose_callers_all_left_is_cancelled() -> None:
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=2, max_wait_s=60, max_weight=100)
    one = asyncio.create_task(c.submit(1))
    await settle()
    two = asyncio.create_task(c.submit(2))
    await settle()
    response = handle.calls[0][1]
    one.cancel()
    await settle()
    assert response.cancelled()  # nobody waits for it: the replica is told to stop
    assert not handle.calls[1][1].cancelled()
    handle.answer(1)
    assert await two == 20
    # the freed slot serves the next request
    three = asyncio.create_task(c.submit(3))
    await settle()
    handle.answer(2)
    assert await three == 30


async def test_a_deadline_withdraws_the_request() -> None:
    from voltage_ray.errors import GatewayTimeout
    from voltage_ray.ingress.guards import within

    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    with pytest.raises(GatewayTimeout):
        await within(c.submit(1), 0.05, "Embedding")
    assert handle.calls[0][1].cancelled()


async def test_requests_share_a_call_only_with_their_own_group() -> None:
    """A call is answered when its last request is: a key's request never rides in a call with
    another key's, whose large requests the replica serves after it."""
    handle = FakeHandle()
    c = Coalescer(handle.send, max_in_flight=1, max_wait_s=60, max_weight=100)
    first = asyncio.create_task(c.submit(1, group="heavy"))
    await settle()
    heavy = [asyncio.create_task(c.submit(i, group="heavy")) for i in (2, 3)]
    light = asyncio.create_task(c.submit(4, group="light"))
    more = asyncio.create_task(c.submit(5, group="heavy"))
    await settle()
    handle.answer(0)
    await settle()
    # The waiting ones leave in order, by group: heavy's together, light's in a call of its own.
    assert [items for items, _ in handle.calls] == [[1], [2, 3, 5]]
    handle.answer(1)
    await settle()
    assert [items for items, _ in handle.calls][2:] == [[4]]
    handle.answer(2)
    assert await light == 40
    assert await asyncio.gather(first, *heavy, more) == [10, 20, 30, 50]


async def test_a_shared_call_is_not_sent_in_the_context_of_the_request_that_flushed_it() -> None:
    """In an async actor Ray's current task is a context variable, and a call made in a
    request's context is cancelled with that request: a call that carries other requests too
    (sent at once, or when the wait ends) is made from a context of its own."""
    import contextvars

    request = contextvars.ContextVar("request", default="none")
    seen: list[str] = []
    handle = FakeHandle()

    def send(items: list[Any]) -> asyncio.Future[list[Any]]:
        seen.append(request.get())
        return handle.send(items)

    c = Coalescer(send, max_in_flight=1, max_wait_s=0.01, max_weight=100)

    async def submit(name: str, item: int) -> Any:
        request.set(name)
        return await c.submit(item)

    first = asyncio.create_task(submit("first", 1))  # sent at once
    await settle()
    later = [asyncio.create_task(submit(f"r{i}", i)) for i in (2, 3)]  # sent when the wait ends
    await asyncio.sleep(0.05)
    for index in range(len(handle.calls)):
        handle.answer(index)
    assert await first == 10 and [await t for t in later] == [20, 30]
    assert seen == ["none"] * len(seen) and len(seen) == 2
