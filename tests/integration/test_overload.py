"""Overload: twenty times a chat model's capacity at once.

The session's tiny-chat decodes 8 rows at once (max_num_seqs) on one replica that takes 16
requests (max_ongoing_requests), and each ingress replica queues 32 more for it (the default
max_queued_requests: four batches per replica). Past that, requests are refused at once with a 503
in the spec's shape and Retry-After, neither queued until their deadline nor billed; the admitted
ones complete, and what is billed is exactly what was answered. /health keeps answering.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from tests.integration.conftest import ServedApp
from tests.integration.test_limits import CHAT, MESSAGES, assert_error, settled

ROWS = 8  # tiny-chat's max_num_seqs
BURST = 20 * ROWS
# Greedy: the tiny model's same long answer every time, so admitted rows stay busy.
FULL = "Model 'tiny-chat' is at capacity; retry shortly"
BODY = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 480, "temperature": 0}


def ms(values: list[float], q: float) -> float:
    return 1000 * sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def test_twenty_times_capacity_at_once(served: ServedApp) -> None:
    key = served.new_key("limits_metered", "overload")
    limits = httpx.Limits(max_connections=BURST + 8, max_keepalive_connections=BURST + 8)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, limits=limits) as c:
        assert await c.post(CHAT, json={**BODY, "max_tokens": 1}, headers=served.headers(key))
        baseline = settled(key)["limits"]
        answers: list[tuple[httpx.Response, float]] = []
        health: list[tuple[int, float]] = []

        async def one() -> None:
            started = time.monotonic()
            r = await c.post(CHAT, json=BODY, headers=served.headers(key))
            answers.append((r, time.monotonic() - started))

        async def probe() -> None:
            while len(answers) < BURST:
                started = time.monotonic()
                r = await c.get("/health")
                health.append((r.status_code, time.monotonic() - started))
                await asyncio.sleep(0.1)

        await asyncio.gather(probe(), *(one() for _ in range(BURST)))
    ok = [r for r, _ in answers if r.status_code == 200]
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert len(ok) + len(refused) == BURST, sorted(r.status_code for r, _ in answers)
    assert len(ok) >= ROWS and len(refused) >= BURST // 2, (len(ok), len(refused))
    for r, _ in refused:
        details: dict[str, Any] = assert_error(
            r, 503, "Model 'tiny-chat' is at capacity; retry shortly"
        )
        assert r.headers["retry-after"] == "1"
        assert details["model"] == "tiny-chat" and details["max_queued_requests"] == 4 * ROWS
    assert health and {status for status, _ in health} == {200}
    # Billed exactly what was answered: the refused requests cost nothing, not even a request.
    answered = sum(r.json()["usage"]["total_tokens"] for r in ok)
    after = settled(key)["limits"]
    assert after["tokens"]["used"] - baseline["tokens"]["used"] == answered
    assert after["requests"]["used"] - baseline["requests"]["used"] == len(ok)
    waits = [s for _, s in refused]
    print(
        f"overload: {BURST} at once: {len(ok)} answered (p50 "
        f"{ms([s for r, s in answers if r.status_code == 200], 0.5):.0f} ms), {len(refused)} "
        f"refused 503 in p50 {ms(waits, 0.5):.0f} ms / p99 {ms(waits, 0.99):.0f} ms; /health "
        f"p50 {ms([s for _, s in health], 0.5):.0f} ms, max "
        f"{1000 * max(s for _, s in health):.0f} ms; billed {answered} tokens = answered; "
        f"median answer {statistics.median(r.json()['usage']['completion_tokens'] for r in ok)}"
        " tokens"
    )
