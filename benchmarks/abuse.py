"""Hardening figures: a flood of invented keys against a paying user, and a chat model at twenty
times its capacity, on `serve_config.yaml` as shipped (HAProxy + throughput-optimized mode; the
chat model is the built-in tiny-llama so the overload part runs in seconds).

    flock /tmp/voltage_bench.lock .venv/bin/python benchmarks/abuse.py [--seconds 15]

1. Flood. A valid key sends embeddings requests one after another for ``--seconds``, alone; then
   again while wrk floods /v1/embeddings from 64 connections with a random key per request
   (``vr_<random id>_<random secret>``). Prints the valid user's p50/p99 and requests in each
   phase and their ratio (aim: p50 under the flood <= 2x alone), the flood's requests/s and
   statuses (401, then 429 once its address failed too often), and the rate of a flood without
   any key, for comparison (a random key should now cost what no key costs).
2. Overload. ``20 x max_num_seqs x replicas`` chat requests at once (greedy, 480 tokens) from a
   fresh key: how many were answered, how fast the rest got their 503 (p50/p99, the burst's
   own wait for the ingress's CPU included), /health latency during the burst, and whether the
   key's stored usage equals the tokens answered. Then a steady overload: the model filled
   gently until it refuses, then 20 requests one after another: their 503 latency, and
   /health's beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, REPO, serve_app

EMBED = {"model": "text-embedding-ada-002", "input": "a fox jumps over the lazy dog"}
CHAT_BODY = {
    "model": "gpt-4",
    "messages": [{"role": "user", "content": "Tell me a story about a fox"}],
    "max_tokens": 480,
    "temperature": 0,
}
FLOOD_LUA = """
local threads = {}
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local hex = "0123456789abcdef"
local function pick(alphabet, n)
  local out = {}
  for i = 1, n do
    local k = math.random(1, #alphabet)
    out[i] = alphabet:sub(k, k)
  end
  return table.concat(out)
end
function setup(thread) table.insert(threads, thread) end
function init(args)
  s401, s429, other = 0, 0, 0
  math.randomseed(os.time() + math.random(1, 1000000))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "text-embedding-ada-002", "input": "a fox"}'
request = function()
  %(key_line)s
  return wrk.format()
end
function response(status, headers, body)
  if status == 401 then s401 = s401 + 1
  elseif status == 429 then s429 = s429 + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    io.write(string.format("STATUS %%d %%d %%d\\n", t:get("s401"), t:get("s429"), t:get("other")))
  end
end
"""
EXPECTED = {200, 503}
RANDOM_KEY = 'wrk.headers["X-VoltageGPU-Key"] = "vr_" .. pick(hex, 12) .. "_" .. pick(chars, 43)'


def app_args() -> dict[str, Any]:
    """serve_config.yaml's app, its chat model the built-in tiny-llama."""
    from voltage_ray.app import load_args

    args = load_args(REPO / "serve_config.yaml")
    for model in args["models"]:
        if model["kind"] == "chat":
            model["source"] = {"builtin": "tiny-llama"}
            model.pop("fallback", None)
    return args


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def valid_user(base: str, key: str, seconds: float) -> list[float]:
    """Embeddings requests one after another for ``seconds``: each latency (all must be 200)."""
    latencies: list[float] = []
    with httpx.Client(base_url=base, headers={"X-VoltageGPU-Key": key}, timeout=60) as c:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.monotonic()
            r = c.post("/v1/embeddings", json=EMBED)
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - started)
    return latencies


def flood(base: str, seconds: float, key_line: str) -> dict[str, float]:
    """wrk at 64 connections for ``seconds``: requests/s and counts by status."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(FLOOD_LUA % {"key_line": key_line})
    cmd = ["wrk", "-t1", "-c64", f"-d{int(seconds)}s", "--timeout", "10s", "-s", script.name]
    out = subprocess.run([*cmd, base + "/v1/embeddings"], capture_output=True, text=True).stdout
    os.unlink(script.name)
    found = {"401": 0.0, "429": 0.0, "other": 0.0, "rps": 0.0}
    for line in out.splitlines():
        if line.startswith("STATUS"):
            for name, value in zip(("401", "429", "other"), line.split()[1:], strict=True):
                found[name] += float(value)
        elif line.startswith("Requests/sec:"):
            found["rps"] = float(line.split()[1])
    return found


def part_flood(base: str, key: str, seconds: float) -> None:
    valid_user(base, key, 3)  # warm up
    alone = valid_user(base, key, seconds)
    print(
        f"valid user alone: {len(alone)} requests in {seconds:.0f} s, p50 {pct(alone, 0.5):.1f} "
        f"ms, p99 {pct(alone, 0.99):.1f} ms",
        flush=True,
    )
    result: dict[str, Any] = {}
    attacker = threading.Thread(
        target=lambda: result.update(flood(base, seconds + 4, RANDOM_KEY)), daemon=True
    )
    attacker.start()
    time.sleep(2)  # the flood is at full speed
    under = valid_user(base, key, seconds)
    attacker.join()
    print(
        f"valid user under the flood: {len(under)} requests, p50 {pct(under, 0.5):.1f} ms, p99 "
        f"{pct(under, 0.99):.1f} ms: p50 {pct(under, 0.5) / pct(alone, 0.5):.2f}x alone "
        f"(aim <= 2x), throughput {len(under) / len(alone):.2f}x",
        flush=True,
    )
    print(
        f"random-key flood, 64 connections: {result['rps']:.0f} requests/s; 401: "
        f"{result['401']:.0f}, 429: {result['429']:.0f}, other: {result['other']:.0f}",
        flush=True,
    )
    none = flood(base, 10, "")
    keyed = flood(base, 10, RANDOM_KEY)
    print(
        f"floods alone, 10 s each: without any key {none['rps']:.0f} requests/s, with random "
        f"keys {keyed['rps']:.0f} requests/s (both throttled: 429s)",
        flush=True,
    )


async def burst(base: str, key: str, n: int) -> dict[str, Any]:
    """``n`` chat requests at once, and meanwhile every 0.25 s a GET /health and one more chat
    request: (status, sent at, seconds, tokens) of each chat request, from the burst's start."""
    headers = {"X-VoltageGPU-Key": key}
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    answers: list[tuple[int, float, float, int]] = []
    probes: list[tuple[int, float, float, int]] = []
    health: list[float] = []
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:

        async def chat() -> tuple[int, float, float, int]:
            started = time.monotonic()
            r = await c.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
            tokens = r.json()["usage"]["total_tokens"] if r.status_code == 200 else 0
            return r.status_code, started - t0, time.monotonic() - started, tokens

        async def one() -> None:
            answers.append(await chat())

        async def check() -> None:
            started = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            health.append(time.monotonic() - started)

        async def single() -> None:
            probes.append(await chat())

        async def probe() -> None:
            sent: list[asyncio.Task[None]] = []
            while len(answers) < n:
                await asyncio.sleep(0.25)
                sent += [asyncio.create_task(check()), asyncio.create_task(single())]
            await asyncio.gather(*sent)

        await asyncio.gather(probe(), *(one() for _ in range(n)))
    return {"answers": answers, "probes": probes, "health": health}


async def saturated(base: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """Keep the chat model full (8 more requests every 0.2 s); once it refuses one, send 20
    requests one after another, and GET /health beside each: (status, seconds) of each."""
    headers = {"X-VoltageGPU-Key": key}
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
    filled: list[int] = []
    probes: list[tuple[int, float]] = []
    health: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:

        async def timed(method: str, path: str, **kw: Any) -> tuple[int, float]:
            started = time.monotonic()
            r = await c.request(method, path, headers=headers, **kw)
            return r.status_code, time.monotonic() - started

        async def fill() -> None:
            filled.append((await timed("POST", "/v1/chat/completions", json=CHAT_BODY))[0])

        tasks: list[asyncio.Task[None]] = []
        probing = True

        async def keep_full() -> None:  # until the probes are done (autoscaling adds places)
            while probing and len(tasks) < 1000:
                tasks.extend(asyncio.create_task(fill()) for _ in range(8))
                await asyncio.sleep(0.2)

        filler = asyncio.create_task(keep_full())
        while 503 not in filled:
            await asyncio.sleep(0.05)
        for _ in range(20):
            probe, check = await asyncio.gather(
                timed("POST", "/v1/chat/completions", json=CHAT_BODY), timed("GET", "/health")
            )
            probes.append(probe)
            health.append(check)
            await asyncio.sleep(0.05)
        probing = False
        await filler
        await asyncio.gather(*tasks)
    return {"probes": probes, "health": health}


def part_overload(base: str, db: Path, capacity: int) -> None:
    from voltage_ray.limits.keys import KeyStore

    store = KeyStore(db)
    record, key = store.create("enterprise", "overload")
    store.close()
    time.sleep(2)  # the ingress replicas learn the key
    n = 20 * capacity
    got = asyncio.run(burst(base, key, n))
    answers, probes = got["answers"], got["probes"]
    ok = [a for a in answers if a[0] == 200]
    refused = [a[2] for a in answers if a[0] == 503]
    print(
        f"overload, {n} chat requests at once ({capacity} rows of capacity): {len(ok)} answered "
        f"(p50 {pct([a[2] for a in ok], 0.5):.0f} ms), {len(refused)} refused 503 in p50 "
        f"{pct(refused, 0.5):.0f} ms / p99 {pct(refused, 0.99):.0f} ms (the burst's own wait for "
        f"the ingress's CPU included), other statuses {sorted({a[0] for a in answers} - EXPECTED)}",
        flush=True,
    )
    print(
        f"overload, /health during the burst: p50 {pct(got['health'], 0.5):.1f} ms / max "
        f"{1000 * max(got['health'], default=0):.1f} ms",
        flush=True,
    )
    answered = [a for a in [*answers, *probes] if a[0] == 200]
    want = (len(answered), sum(a[3] for a in answered), 0)
    time.sleep(3)  # settled and written (every 0.5 s)
    query = "SELECT requests, tokens, reserved_tokens FROM usage WHERE key_id = ?"
    row = tuple(sqlite3.connect(db).execute(query, (record.id,)).fetchone())
    print(
        f"overload billing: stored (requests, tokens, reserved) {row}; answered {want[:2]}: "
        f"{'exact' if row == want else 'MISMATCH'}",
        flush=True,
    )
    steady = asyncio.run(saturated(base, key))
    late = [seconds for status, seconds in steady["probes"] if status == 503]
    checks = [seconds for _, seconds in steady["health"]]
    print(
        f"overload, steady (the model kept full, then 20 requests one at a time): {len(late)} "
        f"refused 503 in p50 {pct(late, 0.5):.1f} ms / max {1000 * max(late, default=0):.1f} "
        f"ms; /health beside them p50 {pct(checks, 0.5):.1f} ms / max "
        f"{1000 * max(checks, default=0):.1f} ms",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=15, help="each valid-user phase")
    p.add_argument("--skip-flood", action="store_true")
    p.add_argument("--skip-overload", action="store_true")
    a = p.parse_args()
    args = app_args()
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    rows = chat["chat"]["max_num_seqs"]
    replicas = chat["deployment"]["autoscaling_config"]["max_replicas"]
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)
    with serve_app(args, env=HA_PROXY_ENV) as app:
        if not a.skip_flood:
            part_flood(app.base_url, app.key, a.seconds)
        if not a.skip_overload:
            part_overload(app.base_url, app.tmp / "voltage.db", rows * replicas)


if __name__ == "__main__":
    main()
