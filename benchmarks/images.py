"""Batched image generation through HTTP against the same requests one after another in-process.

    flock /tmp/voltage_bench.lock .venv/bin/python benchmarks/images.py [--runs 3] [--threads 1]

Both sides run tiny-sd (the built-in default; its images are noise) with the same torch thread
count. In-process: ``ImageEngine.run`` on one request at a time, 4 requests (n=1, 256x256,
10 steps) back to back. Served: a local Ray cluster and Serve app started here (free port), the
same 4 requests sent at once over HTTP (``response_format: b64_json``, so both sides end with PNG
bytes); the deployment batches them into shared pipeline calls. Prints both throughputs, their
ratio (the aim: at least 1.2x), how the requests were grouped into calls, and seconds per image
at every size: in-process n=1, served n=1, and served n=4 (one call for the 4 images).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import free_port

CACHE = str(Path(tempfile.gettempdir()) / "voltage_test_cache")
SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")
BENCH = {"size": "256x256", "num_inference_steps": 10, "guidance_scale": 7.5}
CONCURRENT = 4
PATH = "/v1/images/generations"


def prompts() -> list[str]:
    return [f"benchmark prompt {i}: a lighthouse at dusk" for i in range(CONCURRENT)]


def in_process(runs: int, threads: int) -> tuple[list[float], dict[str, float]]:
    """Seconds for the 4 requests one after another, per run; seconds per image at each size."""
    from voltage_ray.backends.images import Bucket, ImageEngine, Job
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource, ImageSettings

    engine = ImageEngine(
        materialize(BuiltinSource(builtin="tiny-sd"), Path(CACHE)), ImageSettings()
    )
    engine.set_threads(threads)

    def bucket(size: str) -> Bucket:
        w, h = (int(v) for v in size.split("x"))
        return Bucket(w, h, BENCH["num_inference_steps"], BENCH["guidance_scale"])  # type: ignore[arg-type]

    engine.run([Job("warm up", bucket("256x256"), [0])])
    totals = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts()):
            engine.run([Job(prompt, bucket("256x256"), [i])])
        totals.append(time.perf_counter() - t0)
    per_size = {}
    for size in SIZES:
        engine.run([Job("warm up", bucket(size), [0])])  # first call at a shape is slower
        t0 = time.perf_counter()
        engine.run([Job("one image", bucket(size), [1])])
        per_size[size] = time.perf_counter() - t0
    return totals, per_size


def app_args(tmp: Path, threads: int) -> dict[str, Any]:
    return {
        "database": str(tmp / "voltage.db"),
        "plans": str(Path(__file__).resolve().parents[1] / "configs" / "plans.yaml"),
        "cache_dir": CACHE,
        "models": [
            {
                "id": "tiny-sd",
                "kind": "images",
                "aliases": ["dall-e-2"],
                "source": {"builtin": "tiny-sd"},
                "images": {"torch_threads": threads},
                "deployment": {
                    "num_replicas": 1,
                    "max_ongoing_requests": 32,
                    "ray_actor_options": {"num_cpus": 1},
                },
            }
        ],
        "ingress": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}},
    }


async def post_all(c: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    replies = await asyncio.gather(*(c.post(PATH, json=b) for b in bodies))
    elapsed = time.perf_counter() - t0
    for r in replies:
        r.raise_for_status()
    return elapsed


async def drive(
    base: str, key: str, runs: int, handle: Any
) -> tuple[list[float], dict[str, list[float]], list[dict[str, Any]]]:
    """Seconds for the 4 concurrent requests per run, and the pipeline calls they made; served
    s/image at each size (n=1, n=4)."""
    body = {"response_format": "b64_json", **BENCH}
    headers = {"X-VoltageGPU-Key": key}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as c:
        await post_all(c, [{**body, "prompt": p} for p in prompts()])  # warm up
        before = (await handle.stats.remote())["calls"]
        totals = []
        for _ in range(runs):
            bodies = [{**body, "prompt": p, "seed": i} for i, p in enumerate(prompts())]
            totals.append(await post_all(c, bodies))
        stats = await handle.stats.remote()
        calls = stats["recent_calls"][before - stats["calls"] :]
        per_size: dict[str, list[float]] = {}
        for size in SIZES:
            one = {**body, "size": size, "prompt": "one image", "seed": 1}
            await post_all(c, [one])  # warm up
            single = await post_all(c, [one])
            batched = await post_all(c, [{**one, "n": CONCURRENT}]) / CONCURRENT
            per_size[size] = [single, batched]
    return totals, per_size, calls


def served(runs: int, threads: int) -> tuple[list[float], dict[str, list[float]], list[dict]]:
    import ray
    from ray import serve

    from voltage_ray.app import build_app
    from voltage_ray.limits.keys import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="voltage_bench_images_"))
    args = app_args(tmp, threads)
    store = KeyStore(args["database"])
    key = store.create("enterprise", "bench")[1]
    store.close()
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="voltage", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while httpx.get(base + "/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become healthy")
            time.sleep(0.5)
        handle = serve.get_deployment_handle("images-tiny-sd", app_name="voltage")
        totals, per_size, calls = asyncio.run(drive(base, key, runs, handle))
    finally:
        serve.shutdown()
        ray.shutdown()
    return totals, per_size, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed rounds of the 4 requests")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    local, local_sizes = in_process(a.runs, a.threads)
    remote, remote_sizes, calls = served(a.runs, a.threads)
    med = statistics.median
    seq_rate, served_rate = CONCURRENT / med(local), CONCURRENT / med(remote)
    print(
        f"\n{CONCURRENT} requests, n=1, 256x256, 10 steps, torch threads {a.threads}, "
        f"median of {a.runs} runs"
    )
    print(f"  in-process, one after another: {med(local):6.2f} s  {seq_rate:5.2f} images/s")
    print(f"  served over HTTP, concurrent:  {med(remote):6.2f} s  {served_rate:5.2f} images/s")
    print(f"  throughput ratio served/sequential: {served_rate / seq_rate:.2f}x  (aim >= 1.2x)")
    print(f"  requests per pipeline call in the timed rounds: {[c['requests'] for c in calls]}")
    print("\nseconds per image, 10 steps   in-process n=1   served n=1   served n=4 (per image)")
    for size in SIZES:
        single, batched = remote_sizes[size]
        print(
            f"  {size:>9}                  {local_sizes[size]:8.2f}     {single:8.2f}     "
            f"{batched:8.2f}"
        )


if __name__ == "__main__":
    main()
