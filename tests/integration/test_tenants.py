"""One customer cannot take the service from the others.

A heavy key floods a model with more requests than it has rows and queue places, on a generous
plan (48 requests in flight at most); a light key on the same plan sends one request at a time,
with the OpenAI SDK. Every light request succeeds; the heavy key's excess gets 429s (its
max_concurrent_requests) or 503s (its share of the model's queue); what each key is billed is
exactly what it was answered. The same for embeddings: 64 connections of 32-input batches
against single inputs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import httpx
import openai

from tests.integration.conftest import ServedApp
from tests.integration.test_limits import CHAT, EMBED, MESSAGES, assert_error, settled

PLAN_IN_FLIGHT = 48  # conftest's "tenants" plan
ROWS, QUEUE = 8, 32  # tiny-chat: max_num_seqs, and its queue (4 batches)


class Flood:
    """``workers`` connections of one key, each sending its next request as soon as the last
    one ended (after a 429 or 503, a quarter of a second: an impatient client, not one that
    honours Retry-After), until stopped. Counts statuses, and the tokens and requests answered
    (what the key must be billed)."""

    def __init__(self, client: httpx.AsyncClient, key: str, workers: int) -> None:
        self.client, self.key, self.workers = client, key, workers
        self.statuses: collections.Counter[int] = collections.Counter()
        self.tokens = 0
        self.stop = asyncio.Event()

    async def run(self, send: Any) -> None:
        await asyncio.gather(*(self._worker(send) for _ in range(self.workers)))

    async def _worker(self, send: Any) -> None:
        while not self.stop.is_set():
            status, tokens = await send(self.client, {"X-VoltageGPU-Key": self.key})
            self.statuses[status] += 1
            self.tokens += tokens
            if status != 200:
                await asyncio.sleep(0.25)


async def stream_chat(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int]:
    """One streamed chat of the flood: its status and, answered, its total tokens."""
    body = {
        "model": "tiny-chat",
        "messages": MESSAGES,
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", CHAT, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            if r.status_code == 503:
                assert_error(r, 503, "Model 'tiny-chat' is at capacity; retry shortly")
                assert r.headers["retry-after"] == "1"
            else:
                assert r.status_code == 429, r.text
            return r.status_code, 0
        last = ""
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = line
    return 200, json.loads(last[len("data: ") :])["usage"]["total_tokens"]


async def embed_batch(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int]:
    body = {"model": "all-MiniLM-L6-v2", "input": [f"batch input {i}" for i in range(32)]}
    r = await client.post(EMBED, json=body, headers=headers)
    if r.status_code != 200:
        assert r.status_code in (429, 503), r.text
        return r.status_code, 0
    return 200, r.json()["usage"]["total_tokens"]


async def flood_while(served: ServedApp, send: Any, workers: int, light: Any) -> Flood:
    """Run the heavy key's flood until ``light()`` (the light key's requests) returns."""
    heavy = served.new_key("tenants", "heavy")
    limits = httpx.Limits(max_connections=workers + 4, max_keepalive_connections=workers + 4)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, limits=limits) as c:
        flood = Flood(c, heavy, workers)
        running = asyncio.ensure_future(flood.run(send))
        await asyncio.sleep(2.0)  # the model is full before the light key comes
        try:
            await light()
        finally:
            flood.stop.set()
            await running
    usage = settled(heavy)["limits"]
    assert usage["tokens"]["used"] == flood.tokens
    assert usage["requests"]["used"] == flood.statuses[200]
    return flood


def test_a_key_past_its_concurrent_requests_gets_a_429_with_what_is_left(
    served: ServedApp,
) -> None:
    """A plan of one request in flight: a second while a stream runs is a 429 that says so."""
    key = served.new_key("limits_single")
    with served.client() as c:
        r = c.post(
            CHAT,
            headers=served.headers(key),
            json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 1},
        )
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-concurrent-requests"] == "1"
        assert r.headers["x-ratelimit-remaining-concurrent-requests"] == "0"  # this one
        # SmolLM2 with its end-of-sequence tokens banned: a 1500-token stream (half a minute
        # here), cancelled when the block ends, so the next request comes while it runs.
        body = {
            "model": "smol",
            "messages": MESSAGES,
            "max_tokens": 1500,
            "temperature": 0,
            "logit_bias": {"0": -100, "2": -100},
            "stream": True,
        }
        with c.stream("POST", CHAT, headers=served.headers(key), json=body) as s:
            assert s.status_code == 200
            lines = s.iter_lines()  # NOTE: kept: a dropped iterator closes the response
            next(line for line in lines if line.startswith("data: {"))
            plain = {**body, "stream": False, "max_tokens": 1}
            busy = c.post(CHAT, headers=served.headers(key), json=plain)
            details = assert_error(busy, 429, "Rate limit exceeded")
            assert details["limit"] == "max_concurrent_requests" and details["limit_value"] == 1
            assert busy.headers["retry-after"] == "1"
            assert busy.headers["x-ratelimit-remaining-concurrent-requests"] == "0"


async def test_a_flooding_key_never_takes_the_chat_model_from_another(served: ServedApp) -> None:
    light = served.new_key("tenants", "light")
    sdk = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=light, max_retries=0)
    answered: list[int] = []
    waits: list[float] = []

    async def one_at_a_time() -> None:
        for _ in range(8):
            started = time.monotonic()
            stream = await sdk.chat.completions.create(
                model="tiny-chat",
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - started
                if chunk.usage is not None:
                    answered.append(chunk.usage.total_tokens)
            waits.append(first or 0.0)

    flood = await flood_while(served, stream_chat, PLAN_IN_FLIGHT + 8, one_at_a_time)
    assert len(answered) == 8  # every light request succeeded (max_retries=0: no hidden retry)
    assert settled(light)["limits"]["tokens"]["used"] == sum(answered)
    # The heavy key held more than the model's rows and queue: its excess was refused.
    assert flood.statuses[200] > ROWS and flood.statuses[429] > 0 and flood.statuses[503] > 0
    assert set(flood.statuses) <= {200, 429, 503}
    print(
        f"chat flood: heavy {dict(flood.statuses)}; light 8/8 answered, time to first token "
        f"p50 {1000 * sorted(waits)[4]:.0f} ms, max {1000 * max(waits):.0f} ms"
    )


async def test_a_flooding_key_never_takes_the_embeddings_model_from_another(
    served: ServedApp,
) -> None:
    light = served.new_key("tenants", "light")
    sdk = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=light, max_retries=0)
    billed: list[int] = []
    waits: list[float] = []

    async def one_at_a_time() -> None:
        for i in range(12):
            started = time.monotonic()
            r = await sdk.embeddings.create(model="all-MiniLM-L6-v2", input=f"light input {i}")
            waits.append(time.monotonic() - started)
            assert len(r.data) == 1 and len(r.data[0].embedding) == 384
            billed.append(r.usage.total_tokens)

    flood = await flood_while(served, embed_batch, 64, one_at_a_time)
    assert len(billed) == 12
    assert settled(light)["limits"]["tokens"]["used"] == sum(billed)
    assert flood.statuses[200] > 0 and flood.statuses[429] > 0  # 64 connections, 48 in flight
    assert set(flood.statuses) <= {200, 429, 503}
    print(
        f"embeddings flood: heavy {dict(flood.statuses)}; light 12/12 answered, p50 "
        f"{1000 * sorted(waits)[6]:.0f} ms, max {1000 * max(waits):.0f} ms"
    )
