"""The error handlers and SSE framing on a bare FastAPI app (pure code: no Ray needed)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError

from voltage_ray.errors import BadRequest, RateLimited
from voltage_ray.ingress import errors, sse


class FakeStream:
    """Stands in for a DeploymentResponseGenerator: items, then optionally an exception."""

    def __init__(self, items: list[str], exc: Exception | None = None) -> None:
        self.items = list(items)
        self.exc = exc
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self.items:
            return self.items.pop(0)
        if self.exc:
            raise self.exc
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def make_app(stream: FakeStream) -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail /secret/path")

    @app.get("/gone")
    async def gone() -> None:
        raise TaskCancelledError()

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimited(details={"retry_after": 3}, headers={"Retry-After": "3"})

    @app.get("/stream")
    async def stream_route() -> StreamingResponse:
        first = await sse.first_item(stream)
        frames = sse.relay(
            first, stream, lambda s: json.dumps({"x": s}), endpoint="/stream", rid="rid-1"
        )
        return StreamingResponse(frames, media_type="text/event-stream")

    return app


async def get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path)


async def test_unknown_exception_is_500_with_request_id_and_no_internals() -> None:
    r = await get(make_app(FakeStream([])), "/boom")
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "Internal server error"
    assert body["details"]["status"] == 500 and body["details"]["request_id"]
    assert r.headers["x-request-id"] == body["details"]["request_id"]
    assert "secret" not in r.text and "RuntimeError" not in r.text


async def test_a_client_that_went_away_is_no_server_error_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger=errors.logger.name):
        r = await get(make_app(FakeStream([])), "/gone")
    assert r.status_code == 500  # what Serve's cancelled task ends with; no client reads it
    ours = [rec for rec in caplog.records if rec.name == errors.logger.name]
    assert [rec.levelno for rec in ours] == [logging.INFO]
    assert "the client went away" in ours[0].getMessage() and ours[0].exc_info is None


async def test_error_headers_are_kept() -> None:
    r = await get(make_app(FakeStream([])), "/limited")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["details"] == {"status": 429, "endpoint": "/limited", "retry_after": 3}


async def test_error_mid_stream_is_one_error_frame_then_close() -> None:
    stream = FakeStream(["a", "b"], BadRequest("went wrong"))
    r = await get(make_app(stream), "/stream")
    frames = [line for line in r.text.split("\n\n") if line]
    assert frames[:2] == ['data: {"x": "a"}', 'data: {"x": "b"}']
    err = json.loads(frames[2][len("data: ") :])
    assert err == {"error": "went wrong", "details": {"status": 400, "endpoint": "/stream"}}
    assert len(frames) == 3  # no [DONE] after an error
    assert stream.cancelled


async def test_unexpected_error_mid_stream_hides_internals() -> None:
    stream = FakeStream(["a"], RuntimeError("cuda OOM at 0xdeadbeef"))
    r = await get(make_app(stream), "/stream")
    last = json.loads(r.text.strip().split("\n\n")[-1][len("data: ") :])
    assert last["details"]["status"] == 500 and last["details"]["request_id"] == "rid-1"
    assert "deadbeef" not in r.text


async def test_complete_stream_ends_with_done() -> None:
    r = await get(make_app(FakeStream(["a"])), "/stream")
    assert r.text.endswith("data: [DONE]\n\n")


class StalledStream(FakeStream):
    """Yields one item, then waits forever unless cancelled (like a replica stuck generating)."""

    def __init__(self) -> None:
        super().__init__(["a"])
        self._cancel = asyncio.Event()

    async def __anext__(self) -> str:
        if self.items:
            return self.items.pop(0)
        await self._cancel.wait()
        raise RuntimeError("request cancelled")

    def cancel(self) -> None:
        super().cancel()
        self._cancel.set()


async def test_stream_deadline_cancels_the_model_call_and_ends_with_504() -> None:
    stream = StalledStream()
    first = await sse.first_item(stream)
    frames = [
        f async for f in sse.relay(first, stream, json.dumps, endpoint="/s", rid="r", timeout_s=0.2)
    ]
    assert stream.cancelled
    err = json.loads(frames[-1][len("data: ") :])
    assert err["details"]["status"] == 504 and "deadline" in err["error"]


async def test_within_cancels_a_slow_call() -> None:
    from voltage_ray.errors import GatewayTimeout
    from voltage_ray.ingress.guards import within

    class Slow:
        cancelled = False

        def __await__(self):  # type: ignore[no-untyped-def]
            return asyncio.sleep(10).__await__()

        def cancel(self) -> None:
            self.cancelled = True

    slow = Slow()
    with pytest.raises(GatewayTimeout):
        await within(slow, 0.05)
    assert slow.cancelled
