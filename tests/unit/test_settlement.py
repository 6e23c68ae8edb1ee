"""Settle before the last byte: the order of what is sent, and what each status bills."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from voltage_ray.ingress.settlement import REQUEST, SettleBeforeLastByte

HTTP: dict[str, Any] = {"type": "http", "path": "/v1/x", "headers": []}
released: list[str] = []  # places given back, in order


def app(status: int, chunks: list[bytes], admit: bool = True, fail: bool = False) -> Any:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        request = REQUEST.get()
        assert request is not None
        if admit:
            request.tickets.append("ticket")
            request.places["m"] = lambda: released.append("m")
        if fail:
            raise asyncio.CancelledError  # the client went away before any answer
        await send({"type": "http.response.start", "status": status, "headers": []})
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})

    return asgi


async def run(asgi: Any) -> list[Any]:
    events: list[Any] = []

    async def deliver(tickets: list[Any], status: int, wait: bool) -> None:
        events.append(("deliver", list(tickets), status, wait))
        tickets.clear()  # as the ingress marks them settled

    async def send(message: Message) -> None:
        events.append((message.get("body"), message.get("more_body", False)))

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await SettleBeforeLastByte(asgi, deliver)(dict(HTTP), receive, send)
    return events


async def test_the_last_byte_waits_for_the_settlement() -> None:
    released.clear()
    events = await run(app(200, [b'{"ok": true}']))
    assert released == ["m"]  # the request's place, given back at its end
    assert events == [
        (None, False),  # the response's start
        (b'{"ok": true', True),
        ("deliver", ["ticket"], 200, True),
        (b"}", False),
    ]


async def test_a_stream_settles_before_the_chunk_that_ends_it() -> None:
    events = await run(app(200, [b"data: 1\n\n", b"data: [DONE]\n\n", b""]))
    assert events[-2:] == [("deliver", ["ticket"], 200, True), (b"", False)]
    assert events[2] == (b"data: [DONE]\n\n", True)


async def test_errors_carry_their_status_and_no_admission_costs_nothing() -> None:
    events = await run(app(503, [b"{}"]))
    assert ("deliver", ["ticket"], 503, True) in events
    assert await run(app(200, [b"{}"], admit=False)) == [
        (None, False),
        (b"{}", False),
    ]


async def test_a_request_that_ends_without_an_answer_settles_without_waiting() -> None:
    events: list[Any] = []

    async def deliver(tickets: list[Any], status: int, wait: bool) -> None:
        events.append((list(tickets), status, wait))

    async def nothing(message: Message) -> None:
        raise AssertionError("nothing is sent")

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    with pytest.raises(asyncio.CancelledError):
        await SettleBeforeLastByte(app(200, [], fail=True), deliver)(dict(HTTP), receive, nothing)
    assert events == [(["ticket"], 0, False)]
    assert REQUEST.get() is None and released[-1] == "m"
