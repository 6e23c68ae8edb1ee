"""Server-sent events framing for streamed completions.

A stream is opened only after its first item arrived, so errors the model raises up front (a
prompt past the context length) are ordinary JSON errors with their own status. An error in the
middle of a stream becomes one ``data: {"error": ...}`` frame in the spec's shape, then the
stream closes: a replica lost mid-stream is a 503 with ``details.retryable`` and the attempts.
A client that goes away cancels the model call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from voltage_ray.errors import VoltageError
from voltage_ray.ingress.errors import to_voltage_error
from voltage_ray.ingress.guards import Deadline

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(payload: str) -> str:
    return f"data: {payload}\n\n"


def parts(item: Any) -> list[Any]:
    """A handle stream's item as chunks: a replica that batches its stream sends lists."""
    return item if isinstance(item, list) else [item]


async def first_item(gen: Any) -> Any:
    """The first item of a handle stream; cancel the stream if that fails."""
    try:
        return await gen.__anext__()
    except BaseException:
        gen.cancel()
        raise


async def relay(
    first: Any,
    gen: Any,
    render: Callable[[Any], str | None],
    *,
    endpoint: str,
    rid: str,
    on_close: Callable[[BaseException | None], Awaitable[None]] | None = None,
    timeout_s: float | None = None,
    explain: Callable[[BaseException], VoltageError | None] | None = None,
    framed: bool = False,
    error_frame: Callable[[VoltageError], str] | None = None,
) -> AsyncIterator[str]:
    """SSE frames from a handle stream: ``render`` maps a chunk to a JSON payload or None. An
    item that is a list of chunks (a batched stream) becomes one write of their frames.

    ``framed``: ``render`` returns whole frames (the Responses API's ``event:`` lines), and
    the stream ends without ``[DONE]``; ``error_frame`` then renders the error that ends it.

    With ``timeout_s``, the model call is cancelled when the deadline passes, also while the
    client has stopped reading, and the stream ends with a 504 error frame. ``explain`` gives
    the error frame of a failure it knows (a replica lost: a 503 that may be retried).
    """
    deadline = Deadline(gen, timeout_s) if timeout_s else None
    failure: BaseException | None = None
    finished = False
    wrap = (lambda payload: payload) if framed else frame

    def frames_of(item: Any) -> str:
        payloads = (render(chunk) for chunk in parts(item))
        return "".join(wrap(p) for p in payloads if p is not None)

    try:
        if text := frames_of(first):
            yield text
        async for item in gen:
            if text := frames_of(item):
                yield text
        finished = True
        if not framed:
            yield DONE
    except asyncio.CancelledError as exc:  # the client went away
        failure = exc
        raise
    except Exception as exc:
        failure = exc
        known = explain(exc) if explain is not None else None
        err: VoltageError
        if deadline and deadline.expired:
            err = deadline.error()
        else:
            err = known or to_voltage_error(exc, endpoint, rid)
        if error_frame is not None:
            yield error_frame(err)
        else:
            extra = {"request_id": rid} if err.status >= 500 else {}
            yield frame(json.dumps(err.body(endpoint, **extra)))
    finally:
        if deadline:
            deadline.close()
        if not finished:
            gen.cancel()
        if on_close is not None:
            await asyncio.shield(on_close(failure))
