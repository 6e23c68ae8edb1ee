"""The two chat engines side by side on one GPU: voltage_ray's continuous batching
(``engine: transformers``) against vLLM's AsyncLLM (``engine: vllm``), same model, same app,
same load. GPU only: figures are only meaningful on a GPU host (without CUDA or without the vllm
package it exits with one line).

    .venv/bin/python benchmarks/chat_engines.py      # the defaults below; options:
        [--model Qwen/Qwen2.5-1.5B-Instruct] [--max-tokens 256] [--seconds 30]
        [--levels 1,8,32] [--engines transformers,vllm] [--mode greedy|sampled]
        [--stagger 0.05] [--proxy default|haproxy] [--max-context 4096]

On the GPU host: a Python with torch (CUDA), vllm (``pip install 'voltage_ray[vllm]'``) and
voltage_ray's dependencies, ``serve`` on PATH next to that Python, and the model in the local hub
cache (``huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct`` beforehand; the app runs with
HF_HUB_OFFLINE=1) or ``--model /path/to/model-dir``. ``--model`` is a hub id (a ``hub`` source)
or an existing directory (a ``path`` source).

Each engine in turn gets the whole GPU: its app (one chat replica with ``num_gpus: 1``, bfloat16,
``max_num_seqs`` = the top level, the same ``max_context`` on both; vLLM claims its default 0.9
of the GPU's memory) runs under ``serve run`` in its own local Ray cluster
(``_harness.serve_app``), is measured, and is stopped before the next engine's starts. Load:
``benchmarks/chat.py``'s closed loop over HTTP (httpx streaming, ``include_usage``, its long-answer
PROMPTS cycled): per level N workers, worker k starting k * ``--stagger`` s in, each sending
request after request (``--max-tokens``) until ``--seconds`` have passed; requests under way
then run to their end. Per engine and level: aggregate completion tokens/s (usage tokens of all
the level's requests / its wall time, ramp-up and drain included), TTFT p50/p95 (send to the
first content chunk) and ITL p50/p95 (gaps between content chunks of one stream: an engine that
packs several tokens into one chunk shows fewer, longer gaps); then vllm/transformers per level.
Both engines go through the same ingress and proxy (Ray's by default; ``--proxy haproxy`` needs
the haproxy binary), so at high token rates the proxy can cap both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, App, serve_app
from benchmarks.chat import GREEDY, NICE_ENV, SAMPLED, Bodies, Level, burst, closed_loop, pct

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # configs/gpu.yaml's chat model
ENGINES = ("transformers", "vllm")
MODEL_ID = "bench-chat"


def model_source(model: str) -> dict[str, str]:
    """A local directory is a path source; anything else a hub id (from the local cache)."""
    path = Path(model).expanduser()
    return {"path": str(path.resolve())} if path.is_dir() else {"hub": model}


def app_args(engine: str, a: argparse.Namespace) -> dict[str, Any]:
    """``build_app`` args: the model as one chat replica holding the whole GPU."""
    rows = max(a.levels)
    chat: dict[str, Any] = {
        "engine": engine,
        "dtype": "bfloat16",
        "max_num_seqs": rows,
        "max_context": a.max_context,
        "default_max_tokens": a.max_tokens,
    }
    if engine == "transformers":
        chat["max_prefill_tokens"] = a.max_prefill_tokens
    return {
        "models": [
            {
                "id": MODEL_ID,
                "kind": "chat",
                "aliases": ["gpt-4"],  # what benchmarks/chat.py's request bodies name
                "source": model_source(a.model),
                "chat": chat,
                "deployment": {
                    "num_replicas": 1,
                    "ray_actor_options": {"num_cpus": 2, "num_gpus": 1},
                },
            }
        ],
        "ingress": {
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 1024,
                "ray_actor_options": {"num_cpus": 1},
            }
        },
    }


async def measure(app: App, a: argparse.Namespace, engine: str) -> list[Level]:
    """Warm up, then one closed-loop level per ``--levels`` entry; each prints as it ends."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    sampling = GREEDY if a.mode == "greedy" else SAMPLED
    levels: list[Level] = []
    async with httpx.AsyncClient(
        base_url=app.base_url, headers=app.headers(), timeout=900, limits=limits
    ) as client:
        await burst(client, 2, 1, 8)  # warm up: first requests, lazy initialization
        for streams in a.levels:
            bodies = Bodies(a.max_tokens, sampling)
            samples, wall = await closed_loop(client, streams, a.seconds, a.stagger, bodies)
            levels.append(Level(streams, a.mode, samples, wall))
            print(row(engine, levels[-1]), flush=True)
    return levels


def row(engine: str, level: Level) -> str:
    ms = [pct(level.ttfts, q) * 1000 for q in (0.5, 0.95)]
    itl = [pct(level.gaps, q) * 1000 for q in (0.5, 0.95)]
    return (
        f"  {engine:12s} {level.streams:4d}  {len(level.samples):5d} {level.tokens:7d} "
        f"{level.rate:9.1f}   {ms[0]:8.1f} {ms[1]:8.1f}   {itl[0]:7.2f} {itl[1]:7.2f}"
    )


HEADER = (
    f"  {'engine':12s} {'N':>4s}  {'req':>5s} {'tokens':>7s} {'tok/s':>9s}   "
    f"{'ttft p50':>8s} {'p95 ms':>8s}   {'itl p50':>7s} {'p95 ms':>7s}"
)


def run_engine(engine: str, a: argparse.Namespace) -> list[Level] | None:
    env = {**(HA_PROXY_ENV if a.proxy == "haproxy" else {}), **NICE_ENV}
    print(f"\n== {engine}: starting its app (whole GPU)", flush=True)
    try:
        with serve_app(app_args(engine, a), env=env, timeout_s=a.start_timeout) as app:
            print(f"   serving; log {app.tmp / 'serve.log'}\n{HEADER}", flush=True)
            return asyncio.run(measure(app, a, engine))
    except Exception as exc:  # report and go on: the other engine's figures still count
        print(f"   {engine} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None


def summary(results: dict[str, list[Level] | None], levels: list[int]) -> None:
    print("\n== side by side (aggregate completion tok/s; TTFT and ITL in ms)")
    print(HEADER)
    for streams in levels:
        for engine, got in results.items():
            level = next((lv for lv in got or [] if lv.streams == streams), None)
            print(row(engine, level) if level else f"  {engine:12s} {streams:4d}  (no figures)")
    both = {e: got for e, got in results.items() if got}
    if set(both) != set(ENGINES):
        return
    print("\n== vllm / transformers")
    for streams in levels:
        v = next(lv for lv in both["vllm"] if lv.streams == streams)
        t = next(lv for lv in both["transformers"] if lv.streams == streams)
        print(
            f"  {streams:3d} streams: tok/s {ratio(v.rate, t.rate):6.2f}x   "
            f"ttft p50 {ratio(pct(v.ttfts, 0.5), pct(t.ttfts, 0.5)):6.2f}x   "
            f"itl p50 {ratio(pct(v.gaps, 0.5), pct(t.gaps, 0.5)):6.2f}x"
        )


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or model directory")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30.0, help="per level")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument(
        "--engines",
        type=lambda s: [e.strip() for e in s.split(",")],
        default=list(ENGINES),
        help="comma-separated, run in this order (default transformers,vllm)",
    )
    p.add_argument(
        "--mode",
        choices=["greedy", "sampled"],
        default="greedy",
        help="sampled: temperature 0.8, top_p 0.9, penalties 0.3, a seed per request",
    )
    p.add_argument("--stagger", type=float, default=0.05, help="worker k starts k * this s in")
    p.add_argument("--proxy", choices=["default", "haproxy"], default="default")
    p.add_argument("--max-context", type=int, default=4096, help="both engines' context")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="transformers' chunk")
    p.add_argument("--start-timeout", type=float, default=600.0, help="s for an app to start")
    a = p.parse_args()
    unknown = [e for e in a.engines if e not in ENGINES]
    if unknown or not a.engines:
        p.error(f"--engines: choose from {', '.join(ENGINES)} (got {unknown or 'none'})")
    return a


def main() -> None:
    a = parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("chat_engines: needs torch with CUDA; run it on a GPU host")
    if not torch.cuda.is_available():
        sys.exit("chat_engines: needs a CUDA GPU (torch sees none); run it on a GPU host")
    if "vllm" in a.engines and importlib.util.find_spec("vllm") is None:
        sys.exit(
            "chat_engines: needs vllm (pip install 'voltage_ray[vllm]') or --engines transformers"
        )
    print(
        f"chat engines on {torch.cuda.get_device_name(0)}: {a.model}, max_tokens {a.max_tokens}, "
        f"{a.seconds:g} s per level, levels {a.levels}, {a.mode}, stagger {a.stagger:g} s, "
        f"proxy {a.proxy}, max_context {a.max_context}"
    )
    results = {engine: run_engine(engine, a) for engine in a.engines}
    summary(results, a.levels)


if __name__ == "__main__":
    main()
