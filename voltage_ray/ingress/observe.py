"""Request metrics: one count and one latency per HTTP request, whatever its outcome.

Pure ASGI middleware, so a streamed response is timed to its last byte and errors rendered by
the app's handlers are counted with their status. Routes leave what they resolved in
``request.state``: ``model`` (the model id, not the alias asked for) and ``principal`` (its plan).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voltage_ray.metrics import IngressMetrics


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: IngressMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        started = state["started"] = time.monotonic()
        status = 500  # an exception that escapes every handler

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.record(scope, state, status, time.monotonic() - started)

    def record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        model = str(state.get("model") or "")
        principal = state.get("principal")
        plan = getattr(principal, "plan", "") or ""
        tags = {"endpoint": endpoint, "model": model, "status": str(status), "plan": plan}
        self.metrics.requests.inc(tags=tags)
        self.metrics.latency.observe(seconds, tags=tags)


def since_arrival(state: Any) -> float:
    """Seconds since the request arrived (``request.state`` as RequestMetrics set it)."""
    started = getattr(state, "started", None)
    return time.monotonic() - started if started is not None else 0.0
