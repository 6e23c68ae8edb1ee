"""The Responses API against chat completions on the same model, and a stored conversation
continued against the same conversation sent cold. One run, this box.

README's default config (``serve_config.yaml``: SmolLM2 on llama.cpp) under ``serve run`` with
HAProxy, as ``voltage-ray serve`` runs it. Streamed greedy 128-token answers:

1. **tokens/s and TTFT**, ``/v1/responses`` vs ``/v1/chat/completions``, at 1 and 8 concurrent
   streams (the same prompt, alternating rounds so drift hits both alike). Tokens are the
   content deltas received (``response.output_text.delta`` / chat content chunks); TTFT is send
   to the first of them. Aim: responses >= 0.95x chat.
2. **previous_response_id**: a conversation of ``--turns`` turns is stored; its continuation by
   ``previous_response_id`` is timed against the same conversation sent whole with ``store:
   false`` (a cold prefix: its first message made unique), TTFT and ``cached_tokens`` of each.

    .venv/bin/python benchmarks/responses.py [--seconds 20] [--turns 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, REPO, serve_app
from benchmarks.chat import NICE_ENV, pct
from voltage_ray.app import load_args

PROMPT = "Write a long story about a fox who learns to fly."
TOKENS = 128


async def chat(c: httpx.AsyncClient, key: str) -> tuple[float, int, float]:
    """(TTFT, content chunks, seconds) of one streamed chat."""
    body = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
    }
    sent, first, n = time.perf_counter(), 0.0, 0
    async with c.stream("POST", "/v1/chat/completions", json=body, headers=auth(key)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":' in line:
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    n += 1
                    first = first or time.perf_counter() - sent
    return first, n, time.perf_counter() - sent


async def respond(
    c: httpx.AsyncClient, key: str, **extra: Any
) -> tuple[float, int, float, dict[str, Any]]:
    """(TTFT, text deltas, seconds, the final response) of one streamed response."""
    body = {
        "model": "gpt-4",
        "input": PROMPT,
        "max_output_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    sent, first, n, final = time.perf_counter(), 0.0, 0, {}
    async with c.stream("POST", "/v1/responses", json=body, headers=auth(key)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and event["delta"]:
                n += 1
                first = first or time.perf_counter() - sent
            elif event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
    return first, n, time.perf_counter() - sent, final


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def level(base: str, key: str, kind: str, streams: int, seconds: float) -> dict[str, Any]:
    """``streams`` clients looping ``kind`` for ``seconds``: tokens/s and TTFTs."""
    ttfts: list[float] = []
    tokens = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=300) as c:

        async def loop() -> None:
            nonlocal tokens
            while time.perf_counter() < stop:
                if kind == "chat":
                    first, n, _ = await chat(c, key)
                else:
                    first, n, _, _ = await respond(c, key, store=False)
                ttfts.append(first)
                tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(streams)))
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "ttft": ttfts}


async def continuation(base: str, key: str, turns: int, rounds: int) -> dict[str, Any]:
    """TTFT and cached tokens: a stored conversation continued, against it sent cold."""
    warm_ttft, cold_ttft, warm_cached, cold_cached = [], [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        for _ in range(rounds):
            tag = uuid.uuid4().hex[:8]  # a prefix no cache holds
            items: list[dict[str, Any]] = []
            previous = None
            for t in range(turns):
                text = f"[{tag}] Turn {t}: tell me one more fact about foxes."
                extra = {"previous_response_id": previous} if previous else {}
                _, _, _, final = await respond(c, key, input=text, max_output_tokens=32, **extra)
                previous = final["id"]
                items.append({"role": "user", "content": text})
                items += [
                    {"role": "assistant", "content": o["content"][0]["text"]}
                    for o in final["output"]
                    if o["type"] == "message"
                ]
            question = "Now summarise everything in one sentence."
            first, _, _, warm = await respond(
                c, key, input=question, previous_response_id=previous, max_output_tokens=16
            )
            warm_ttft.append(first)
            warm_cached.append(warm["usage"]["input_tokens_details"]["cached_tokens"])
            cold_items = [{"role": "user", "content": f"[cold {uuid.uuid4().hex}]"}, *items]
            cold_items.append({"role": "user", "content": question})
            first, _, _, cold = await respond(
                c, key, input=cold_items, store=False, max_output_tokens=16
            )
            cold_ttft.append(first)
            cold_cached.append(cold["usage"]["input_tokens_details"]["cached_tokens"])
            prompt = warm["usage"]["input_tokens"]
    return {
        "warm_ttft": warm_ttft,
        "cold_ttft": cold_ttft,
        "warm_cached": warm_cached,
        "cold_cached": cold_cached,
        "prompt": prompt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each measurement's window")
    parser.add_argument("--streams", default="1,8", help="concurrent streams to measure")
    parser.add_argument("--turns", type=int, default=6, help="turns of the stored conversation")
    parser.add_argument("--rounds", type=int, default=5, help="continuations timed")
    args = parser.parse_args()
    config = load_args(REPO / "serve_config.yaml")
    with serve_app(config, env={**HA_PROXY_ENV, **NICE_ENV}) as app:

        async def measure() -> None:
            await chat(httpx.AsyncClient(base_url=app.base_url, timeout=300), app.key)  # warm
            for streams in [int(s) for s in args.streams.split(",")]:
                got: dict[str, list[dict[str, Any]]] = {"chat": [], "responses": []}
                for _ in range(2):  # alternate, so drift hits both alike
                    for kind in ("responses", "chat"):
                        got[kind].append(
                            await level(app.base_url, app.key, kind, streams, args.seconds / 2)
                        )
                rate = {k: statistics.mean(r["tokens_per_s"] for r in v) for k, v in got.items()}
                ttft = {
                    k: pct([t for r in v for t in r["ttft"]], 0.5) * 1000 for k, v in got.items()
                }
                print(
                    f"{streams} stream(s): tokens/s responses {rate['responses']:6.1f}, chat "
                    f"{rate['chat']:6.1f}: {rate['responses'] / rate['chat']:.3f}x;  TTFT p50 "
                    f"responses {ttft['responses']:5.1f} ms, chat {ttft['chat']:5.1f} ms: "
                    f"{ttft['responses'] / ttft['chat']:.2f}x"
                )
            r = await continuation(app.base_url, app.key, args.turns, args.rounds)
            warm, cold = pct(r["warm_ttft"], 0.5) * 1000, pct(r["cold_ttft"], 0.5) * 1000
            print(
                f"previous_response_id ({args.turns} turns, {r['prompt']} prompt tokens): TTFT p50"
                f" {warm:.1f} ms, cached_tokens {statistics.median(r['warm_cached']):.0f};"
                f" the same sent cold: {cold:.1f} ms, cached_tokens"
                f" {statistics.median(r['cold_cached']):.0f}; ratio {warm / cold:.2f}x"
            )

        asyncio.run(measure())


if __name__ == "__main__":
    main()
