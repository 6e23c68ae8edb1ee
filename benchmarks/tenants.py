"""Tenant isolation: one key's latency alone and under another key's flood, and what the flood
keeps of its throughput. One run, this box.

README's default config (``serve_config.yaml``: SmolLM2 on llama.cpp, two threads, 8 rows, the
embeddings and images models beside it) under ``serve run`` with HAProxy, as ``voltage-ray
serve`` runs it. Two keys on one plan with no limits (``bench``), so that fair scheduling alone
keeps them apart (``--plan pro`` runs them on configs/plans.yaml's pro plan instead):

1. **L alone**: L sends one streamed 32-token chat at a time (greedy), ``--light`` requests:
   its time to first token (TTFT, send to the first content chunk), p50 and p99.
2. **H alone**: H keeps ``--streams`` (48) streamed 128-token chats open for ``--seconds``: each
   of its workers sends its next request when the last ended (after a 429 or 503, once its
   ``Retry-After`` has passed, as the OpenAI SDK does; ``--retry-at-once``: at once). H's
   throughput: content chunks (tokens) received per second over the window.
3. **H and L**: the same flood, L sending one request at a time through it: L's TTFT and
   failures, H's throughput over the same window.

Windows 2 and 3 alternate for ``--rounds`` pairs (2 then 3, 3 then 2, ...), each flood starting
afresh, so that load from elsewhere on a shared box falls on both alike: H's rates are the
medians of each kind's windows (one window each varied by a fifth from run to run here).

Per ``--headroom`` setting (``chat.headroom_rows``: 1, a row kept for a key under its fair share;
0, preemption alone) one app. Prints ratios: L's TTFT p50 under the flood over alone (aim
<= 5x), L's failures (aim 0), H's throughput with L over without (aim >= 0.9x), and the total
(H's and L's tokens together) with L over H's alone: what the isolation itself costs, since L's
own tokens take their share of a compute-bound model.

    .venv/bin/python benchmarks/tenants.py [--headroom 1,0] [--seconds 40] [--streams 48]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, REPO, serve_app
from benchmarks.chat import NICE_ENV, PROMPTS, pct
from voltage_ray.app import load_args
from voltage_ray.limits.keys import KeyStore

PLANS = "plans:\n  bench: {}\n  pro: {max_concurrent_requests: 16, priority: 1}\n"
CHAT = "/v1/chat/completions"
LIGHT = "What is the capital of France? Answer in one long sentence."


def body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


@dataclass
class Flood:
    """H's workers and what they received."""

    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    retry_at_once: bool = False

    def rate(self, start: float, end: float) -> float:
        """Tokens (content chunks) per second received in [start, end)."""
        return sum(start <= t < end for t in self.chunks) / (end - start)


async def stream(client: httpx.AsyncClient, key: str, payload: dict[str, Any]) -> Any:
    """One streamed chat: (status, TTFT or None, arrival times of its content chunks)."""
    start = time.perf_counter()
    arrivals: list[float] = []
    headers = {"X-VoltageGPU-Key": key}
    async with client.stream("POST", CHAT, json=payload, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, arrivals
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter())
    ttft = arrivals[0] - start if arrivals else None
    return 200, ttft, arrivals


async def flood(client: httpx.AsyncClient, key: str, streams: int, out: Flood) -> None:
    async def worker(k: int) -> None:
        await asyncio.sleep(k * 0.02)
        i = k
        while not out.stop.is_set():
            status, _, arrivals = await stream(client, key, body(PROMPTS[i % len(PROMPTS)], 128))
            out.statuses[status] += 1
            out.chunks += arrivals
            i += 1
            if status != 200 and not out.retry_at_once:
                await asyncio.sleep(1.0)  # the Retry-After of a 429 or 503

    await asyncio.gather(*(worker(k) for k in range(streams)))


async def light(
    client: httpx.AsyncClient, key: str, n: int, chunks: list[float] | None = None
) -> tuple[list[float], int]:
    """L's requests one at a time: TTFTs of the answered, and how many failed; the arrival of
    each of its content chunks goes to ``chunks``."""
    ttfts, failed = [], 0
    for _ in range(n):
        status, ttft, arrivals = await stream(client, key, body(LIGHT, 32))
        if status == 200 and ttft is not None:
            ttfts.append(ttft)
        else:
            failed += 1
        if chunks is not None:
            chunks += arrivals
    return ttfts, failed


async def measure(base: str, heavy: str, lite: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        await light(c, lite, 3)  # warm up
        alone, _ = await light(c, lite, args.light)

        async def window(with_light: bool) -> tuple[float, float, list[float], int, Flood]:
            out = Flood(retry_at_once=args.retry_at_once)
            running = asyncio.ensure_future(flood(c, heavy, args.streams, out))
            await asyncio.sleep(args.ramp)  # the flood fills the model first
            start = time.perf_counter()
            ttfts: list[float] = []
            mine: list[float] = []  # L's content chunks
            failed = 0
            while time.perf_counter() - start < args.seconds:
                if with_light:
                    got, bad = await light(c, lite, 1, mine)
                    ttfts += got
                    failed += bad
                else:
                    await asyncio.sleep(0.5)
            end = time.perf_counter()
            out.stop.set()
            await running
            l_rate = sum(start <= t < end for t in mine) / (end - start)
            return out.rate(start, end), l_rate, ttfts, failed, out

        # Alternate the two windows (alone, with L; then with L, alone; ...) so that load from
        # elsewhere on the box falls on both alike; medians of H's rates, L's requests pooled.
        h_alone: list[float] = []
        h_with: list[float] = []
        l_rates: list[float] = []
        under: list[float] = []
        failed = 0
        alone_statuses: collections.Counter[int] = collections.Counter()
        with_statuses: collections.Counter[int] = collections.Counter()
        for i in range(args.rounds):
            for with_light in (False, True) if i % 2 == 0 else (True, False):
                h_rate, l_rate, ttfts, bad, out = await window(with_light)
                (h_with if with_light else h_alone).append(h_rate)
                (with_statuses if with_light else alone_statuses).update(out.statuses)
                if with_light:
                    l_rates.append(l_rate)
                    under += ttfts
                    failed += bad
                print(
                    f"  round {i + 1}, H {'with L' if with_light else 'alone '}: "
                    f"{h_rate:6.1f} tokens/s" + (f", L {l_rate:.1f}" if with_light else ""),
                    flush=True,
                )
    return {
        "l_alone": alone,
        "l_under": under,
        "l_failed": failed,
        "l_rate": statistics.median(l_rates),
        "h_alone": statistics.median(h_alone),
        "h_with": statistics.median(h_with),
        "rounds": args.rounds,
        "statuses": (dict(alone_statuses), dict(with_statuses)),
    }


def run(headroom: int, args: argparse.Namespace) -> dict[str, Any]:
    config = load_args(REPO / "serve_config.yaml")
    for model in config["models"]:
        if model["kind"] == "chat":
            model["chat"] = {**model.get("chat", {}), "headroom_rows": headroom}
            if args.rows:
                model["chat"]["max_num_seqs"] = args.rows
    env = {**HA_PROXY_ENV, **NICE_ENV}
    with serve_app(config, env=env, plan=args.plan, plans_text=PLANS) as app:
        store = KeyStore(app.tmp / "voltage.db")
        try:
            lite = store.create(args.plan, "light")[1]
        finally:
            store.close()
        time.sleep(2)  # the ingress copies the key store every half second
        return asyncio.run(measure(app.base_url, app.key, lite, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headroom", default="1,0", help="chat.headroom_rows settings to run")
    parser.add_argument("--seconds", type=float, default=40.0, help="each flood's window")
    parser.add_argument("--ramp", type=float, default=10.0, help="flood time before the window")
    parser.add_argument("--streams", type=int, default=48, help="H's streams")
    parser.add_argument("--light", type=int, default=20, help="L's requests alone")
    parser.add_argument("--plan", default="bench", choices=["bench", "pro"])
    parser.add_argument("--retry-at-once", action="store_true", help="H ignores Retry-After")
    parser.add_argument("--rows", type=int, default=0, help="chat.max_num_seqs (default: config)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating pairs of windows (H alone, H with L)"
    )
    args = parser.parse_args()
    for headroom in [int(h) for h in args.headroom.split(",")]:
        r = run(headroom, args)
        alone, under = r["l_alone"], r["l_under"]
        a50, u50 = pct(alone, 0.5) * 1000, pct(under, 0.5) * 1000
        print(
            f"\nheadroom_rows {headroom}, rows {args.rows or 'as configured'}, plan {args.plan}, "
            f"H {args.streams} streams:"
        )
        print(
            f"  L TTFT alone:        p50 {a50:6.1f} ms  p99 {pct(alone, 0.99) * 1000:6.1f} ms"
            f"  ({len(alone)} requests)"
        )
        print(
            f"  L TTFT under flood:  p50 {u50:6.1f} ms  p99 {pct(under, 0.99) * 1000:6.1f} ms"
            f"  ({len(under)} answered, {r['l_failed']} failed)   p50 ratio {u50 / a50:.2f}x"
        )
        print(
            f"  H tokens/s, medians of {r['rounds']} windows each: alone {r['h_alone']:6.1f}, "
            f"with L {r['h_with']:6.1f}   ratio "
            f"{r['h_with'] / r['h_alone']:.3f}x   H statuses {r['statuses']}"
        )
        total = r["h_with"] + r["l_rate"]
        print(
            f"  H + L tokens/s with L: {total:6.1f} ({r['l_rate']:.1f} of them L's)   over H "
            f"alone {total / r['h_alone']:.3f}x"
        )


if __name__ == "__main__":
    main()
