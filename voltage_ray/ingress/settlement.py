"""Settle before the last byte: an answer is billed exactly once, even if its ingress dies.

Pure ASGI middleware around the whole app. It makes each request's :class:`~.meter.Meter`
(handed to the routes with ``Depends(get_meter)``), and everything the request was admitted for
is delivered to the limiter after the response has started and before its last byte leaves:
the body's last byte is held back until the limiter has the settlement (a stream's last bytes
are the chunk that ends it, after ``[DONE]``). So when an ingress replica dies:

- before the response started, the proxy replays the request on another replica; the dead
  replica's hold is voided by the limiter once Ray reports it dead (``limits/owners.py``), so
  the replay counts once;
- after it started and before the settlement arrived, the client saw a cut response: voided,
  nothing billed;
- after the settlement arrived, the answer is billed (only its last byte was still to go).

What is billed follows the status: a success bills what the route recorded
(``Meter.record``), another 4xx/5xx bills nothing, and a 503 (the model at capacity, no
replica left) gives the request back too. A request that ends without a response (its client
left) bills what was recorded, without waiting.

A request with an ``Idempotency-Key`` header is fingerprinted (its method, path and body) and its
response kept whole while it is sent: the settlement carries it to the limiter, which answers a
repeat of the key with it (``limits/idempotency.py``). So an answer whose last byte was lost,
with its node or its connection, is sent again when the client retries, and billed once.

The request's places among those a model may hold at once (``Models.occupy``) are given back
when it ends, after its last byte.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voltage_ray.ingress.meter import METER, Admissions, Meter
from voltage_ray.limits.idempotency import Answer

# Response headers a kept answer does not repeat (the replay's own framing and id replace them).
FRAMING = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"date", b"server", b"x-request-id"}
)


class SettleBeforeLastByte:
    """Each request gets a :class:`Meter` of ``admissions`` (under ``scope["voltage.meter"]``);
    its tickets not yet settled are delivered for the response's status (0: none was sent),
    waiting until the limiter has them before the last byte; with an Idempotency-Key, with the
    whole response (None: more than ``max_answer_bytes``)."""

    def __init__(
        self, app: ASGIApp, admissions: Admissions, max_answer_bytes: int = 4 << 20
    ) -> None:
        self.app = app
        self.admissions = admissions
        self.max_answer_bytes = max_answer_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meter = scope[METER] = Meter(self.admissions)
        tickets = meter.tickets
        status = 0
        kept: list[bytes] | None = None  # the response so far, for an Idempotency-Key
        size = 0
        headers: tuple[tuple[str, str], ...] = ()
        key = dict(scope.get("headers") or []).get(b"idempotency-key")
        if key is not None:
            meter.keyed(key.decode("latin-1"), scope["method"], scope["path"])
            kept = []
            receive = hashing(receive, meter.digest)

        async def settling_send(message: Message) -> None:
            nonlocal status, kept, headers, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if kept is not None:
                    headers = tuple(
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in message.get("headers", [])
                        if k.lower() not in FRAMING
                    )
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if kept is not None:
                    size += len(body)
                    if size <= self.max_answer_bytes:
                        kept.append(body)
                    else:
                        kept = None
                if tickets and not message.get("more_body", False):
                    answer = Answer(status, headers, b"".join(kept)) if kept is not None else None
                    if body:  # everything but the last byte goes first
                        await send(
                            {"type": "http.response.body", "body": body[:-1], "more_body": True}
                        )
                        message = {**message, "body": body[-1:]}
                    await meter.deliver(status, True, answer)
            await send(message)

        try:
            await self.app(scope, receive, settling_send)
        finally:
            if tickets:
                await asyncio.shield(meter.deliver(status, False, None))
            meter.release()


def hashing(receive: Receive, digest: Any) -> Receive:
    """``receive`` that feeds the request body to ``digest`` as the app reads it."""

    async def hashed() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            digest.update(message.get("body", b""))
        return message

    return hashed
