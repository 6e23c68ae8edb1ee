"""Settle before the last byte: an answer is billed exactly once, even if its ingress dies.

Pure ASGI middleware around the whole app. Everything a request was admitted for (its tickets,
registered by ``Ingress.admit`` in its :class:`RequestScope`) is delivered to the limiter after the
response has started and before its last byte leaves: the body's last byte is held back until
the limiter has the settlement (a stream's last bytes are the chunk that ends it, after
``[DONE]``). So when an ingress replica dies:

- before the response started, the proxy replays the request on another replica; the dead
  replica's hold is voided by the limiter once Ray reports it dead (``limits/owners.py``), so
  the replay counts once;
- after it started and before the settlement arrived, the client saw a cut response: voided,
  nothing billed;
- after the settlement arrived, the answer is billed (only its last byte was still to go).

What is billed follows the status: a success bills what the route recorded
(``Ingress.settle``), another 4xx/5xx bills nothing, and a 503 (the model at capacity, no
replica left) gives the request back too. A request that ends without a response (its client
left) bills what was recorded, without waiting.

The request's places among those a model may hold at once (``Ingress.occupy``) are given back
when it ends, after its last byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class RequestScope:
    """What the HTTP request being served holds until its response ends."""

    tickets: list[Any] = field(default_factory=list)  # admissions, settled before the last byte
    places: dict[str, Callable[[], None]] = field(default_factory=dict)  # model id -> release


# The scope of the HTTP request being served (set per request by the middleware below).
REQUEST: ContextVar[RequestScope | None] = ContextVar("voltage_request", default=None)

Deliver = Callable[[list[Any], int, bool], Awaitable[None]]


class SettleBeforeLastByte:
    """``deliver(tickets, status, wait)`` settles the tickets not yet settled for a response of
    ``status`` (0: none was sent), waiting until the limiter has them when ``wait``."""

    def __init__(self, app: ASGIApp, deliver: Deliver) -> None:
        self.app = app
        self.deliver = deliver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = RequestScope()
        tickets = request.tickets
        token = REQUEST.set(request)
        status = 0

        async def settling_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body"
                and tickets
                and not message.get("more_body", False)
            ):
                body = message.get("body", b"")
                if body:  # everything but the last byte goes first
                    await send({"type": "http.response.body", "body": body[:-1], "more_body": True})
                    message = {**message, "body": body[-1:]}
                await self.deliver(tickets, status, True)
            await send(message)

        try:
            await self.app(scope, receive, settling_send)
        finally:
            REQUEST.reset(token)
            if tickets:
                await asyncio.shield(self.deliver(tickets, status, False))
            for release in request.places.values():
                release()
