"""Settle before the last byte: the order of what is sent, and what each status bills."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from voltage_ray.ingress.meter import METER, Meter
from voltage_ray.ingress.settlement import SettleBeforeLastByte
from voltage_ray.limits.idempotency import Answer

HTTP: dict[str, Any] = {"type": "http", "path": "/v1/x", "headers": []}
released: list[str] = []  # places given back, in order


def app(status: int, chunks: list[bytes], admit: bool = True, fail: bool = False) -> Any:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        meter: Meter = scope[METER]  # the request's, made by the middleware
        if admit:
            meter.tickets.append("ticket")  # type: ignore[arg-type]
            meter.places["m"] = lambda: released.append("m")
        if fail:
            raise asyncio.CancelledError  # the client went away before any answer
        await send({"type": "http.response.start", "status": status, "headers": []})
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})

    return asgi


class Admissions:
    """Stands in for ``meter.Admissions``: ``deliver`` is what the middleware calls."""

    def __init__(self, deliver: Any) -> None:
        self.deliver = deliver


async def run(asgi: Any) -> list[Any]:
    events: list[Any] = []

    async def deliver(tickets: list[Any], status: int, wait: bool, answer: Any) -> None:
        events.append(("deliver", list(tickets), status, wait))
        assert answer is None  # no Idempotency-Key
        tickets.clear()  # as the ingress marks them settled

    async def send(message: Message) -> None:
        events.append((message.get("body"), message.get("more_body", False)))

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await SettleBeforeLastByte(asgi, Admissions(deliver))(dict(HTTP), receive, send)  # type: ignore[arg-type]
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

    async def deliver(tickets: list[Any], status: int, wait: bool, answer: Any) -> None:
        events.append((list(tickets), status, wait, answer))

    async def nothing(message: Message) -> None:
        raise AssertionError("nothing is sent")

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    middleware = SettleBeforeLastByte(app(200, [], fail=True), Admissions(deliver))  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await middleware(dict(HTTP), receive, nothing)
    assert events == [(["ticket"], 0, False, None)]
    assert released[-1] == "m"


async def keyed(
    chunks: list[bytes], body: bytes, status: int = 200, max_bytes: int = 1000
) -> tuple[Answer | None, str]:
    """Serve ``chunks`` to a request with an Idempotency-Key and ``body``: the answer delivered
    with the settlement, and the request's fingerprint."""
    delivered: list[Answer | None] = []
    seen: list[str] = []

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        meter: Meter = scope[METER]
        assert meter.idempotency_key == "k-1"
        meter.tickets.append("ticket")  # type: ignore[arg-type]
        while (await receive()).get("more_body"):  # the route reads the whole body
            pass
        seen.append(meter.fingerprint())
        headers = [(b"content-type", b"text/event-stream"), (b"content-length", b"9")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1}
            )

    async def deliver(tickets: list[Any], status: int, wait: bool, answer: Any) -> None:
        if wait:
            delivered.append(answer)
        tickets.clear()

    parts = [body[:3], body[3:]]

    async def receive() -> Message:
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    async def send(message: Message) -> None:
        pass

    scope = {**HTTP, "method": "POST", "headers": [(b"idempotency-key", b"k-1")]}
    middleware = SettleBeforeLastByte(asgi, Admissions(deliver), max_answer_bytes=max_bytes)  # type: ignore[arg-type]
    await middleware(scope, receive, send)
    return delivered[0], seen[0]


async def test_an_idempotent_request_settles_with_its_whole_answer() -> None:
    answer, fingerprint = await keyed([b"data: 1\n\n", b"data: [DONE]\n\n", b""], b'{"a": 1}')
    stream = b"data: 1\n\ndata: [DONE]\n\n"
    assert answer == Answer(200, (("content-type", "text/event-stream"),), stream)
    _, same = await keyed([b"{}"], b'{"a": 1}')
    _, other = await keyed([b"{}"], b'{"a": 2}')
    assert fingerprint == same != other and len(fingerprint) == 64
    too_large, _ = await keyed([b"x" * 600, b"y" * 600], b"{}")
    assert too_large is None  # past max_answer_bytes: not kept
