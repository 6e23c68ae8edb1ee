"""Limits on what one request may cost, checked before it reaches a model.

The body-size limit is ASGI middleware: it refuses a declared ``Content-Length`` over the limit
before reading anything, and counts the bytes of a chunked body as they arrive, so an oversized
upload is never buffered whole. The other limits are plain functions the routes call.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voltage_ray.errors import BadRequest, GatewayTimeout, PayloadTooLarge


class BodySizeLimit:
    """413 in the spec's shape for request bodies over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading unchanged; the app's
                    # handler renders it in the spec's shape.
                    raise HTTPException(413, f"Request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        err = PayloadTooLarge(
            f"Request body exceeds the limit of {self.max_bytes} bytes",
            details={"max_bytes": self.max_bytes},
        )
        body = json.dumps(err.body(scope.get("path", ""))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def at_most(value: int, limit: int | None, what: str, **details: Any) -> None:
    """BadRequest when ``value`` exceeds a configured ``limit`` (None: unlimited)."""
    if limit is not None and value > limit:
        raise BadRequest(
            f"{what} is {value}, over this service's limit of {limit}",
            details={"limit": limit, **details},
        )


async def within(response: Any, timeout_s: float, what: str = "Model call") -> Any:
    """Await a handle response (or a coroutine); past ``timeout_s`` cancel it (on the replica)
    and raise a 504."""

    async def wait() -> Any:
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        if hasattr(response, "cancel"):
            response.cancel()
        raise GatewayTimeout(
            f"{what} exceeded its deadline of {timeout_s:g} s", details={"timeout_s": timeout_s}
        ) from None


class Deadline:
    """A deadline for a stream: when it passes, the model call is cancelled on the replica,
    even while the client has stopped reading (the relay may be stuck in a send)."""

    def __init__(self, gen: Any, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.expired = False

        def expire() -> None:
            self.expired = True
            gen.cancel()

        self._timer = asyncio.get_running_loop().call_later(timeout_s, expire)

    def error(self) -> GatewayTimeout:
        return GatewayTimeout(
            f"Stream exceeded its deadline of {self.timeout_s:g} s",
            details={"timeout_s": self.timeout_s},
        )

    def close(self) -> None:
        self._timer.cancel()
