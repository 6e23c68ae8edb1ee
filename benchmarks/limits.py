"""What the limits cost: the limiter actor's admissions per second, and embeddings throughput
with limits on against limits off, in one run.

    flock /tmp/voltage_bench.lock .venv/bin/python benchmarks/limits.py [--seconds 10]

1. Admissions: a fresh local Ray cluster, the real limiter actor, and caller actors that admit
   and settle as ingress replicas do: one direct `admit` call per request, or through the
   LimiterClient the ingress uses (admissions and settlements coalesced into shared round
   trips). Prints admissions/s and admit latency, then checks the actor counted every
   admission and token exactly. With --responses-kb N, another actor stores responses of N KiB
   through the limiter meanwhile (4 at a time), as /v1/responses does, and their rate is shown:
   what large stored responses cost admissions. First, one admission then its settlement, one
   call at a time: what a request waits for the limiter at each end (both answered once on disk).
   With --against REV (e.g. the revision before a change to the limiter), the same measurements
   run against REV's limiter and this one in alternating rounds (--rounds), and the ratio of
   their medians is printed: 4 coalescing callers' admissions/s, and the one-at-a-time latencies.
2. Embeddings: one `serve run` holding benchmarks/embeddings.py's app twice, limits on at /on
   and limits off (keys still authenticated) at /off, on a key whose plan has real, non-binding
   limits. Its small-request load (wrk, 64 connections, one short input per request) goes to
   each in alternating rounds, so load from elsewhere on the machine hits both alike. Prints
   each round, the medians, and what the limits cost (aim: <= 10%). First, one request at a
   time, alternating between the apps: the latency the limits add (admission, then the
   settlement each answer's last byte waits for), p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
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
from benchmarks._harness import free_port, stop
from benchmarks.embeddings import MODEL_NAME, app_args, wrk_load

PLANS = """\
plans:
  bench:
    requests_per_minute: 1000000000
    tokens_per_minute: 1000000000000
    tokens_per_month: 1000000000000000
    images_per_month: 1000000
    max_concurrent_requests: 1000000
  enterprise: {}
"""

# --- 1. the actor -------------------------------------------------------------------------------


async def _caller_loop(
    limiter: Any, key_id: str, concurrency: int, seconds: float, coalesce: bool
) -> dict[str, Any]:
    """Admit and settle in a loop, as an ingress replica does: through the LimiterClient
    (coalesced exchanges), or with one direct ``admit`` call per request."""
    from voltage_ray.limits.client import LimiterClient
    from voltage_ray.limits.limiter import Grant

    client = LimiterClient(lambda: limiter)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    admitted = 0

    async def worker() -> None:
        nonlocal admitted
        while time.monotonic() < deadline:
            t = time.perf_counter()
            if coalesce:
                g = await client.admit(key_id, ("m",), 12, 0)
            else:
                g = await limiter.admit.remote(key_id, ("m",), 12, 0)
            latencies.append(time.perf_counter() - t)
            assert isinstance(g, Grant), g
            admitted += 1
            client.settle(g, 7, 0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.drain()
    latencies.sort()
    return {
        "admitted": admitted,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


async def _store_loop(limiter: Any, kb: int, seconds: float) -> int:
    """Store responses of ``kb`` KiB through the limiter, 4 at a time, for ``seconds``."""
    from voltage_ray.limits.client import LimiterClient
    from voltage_ray.limits.responses import StoredResponse

    client = LimiterClient(lambda: limiter)
    deadline = time.monotonic() + seconds
    stored = 0

    async def worker(w: int) -> None:
        nonlocal stored
        while time.monotonic() < deadline:
            now = time.time()
            item = {"type": "message", "role": "user", "content": "x" * (kb * 1024)}
            record = StoredResponse(
                f"resp_{w}_{stored}", "bench", "m", "completed", {"status": "completed"},
                [item], [item], created_at=now, expires_at=now + 3600,
            )  # fmt: skip
            await client.responses.put(record)
            stored += 1

    await asyncio.gather(*(worker(w) for w in range(4)))
    return stored


async def _one_at_a_time(limiter: Any, key_id: str, n: int) -> dict[str, float]:
    """Admit, then settle, one call after the other with nothing else running: what one request
    waits for at each end (each answered once committed)."""
    from voltage_ray.limits.limiter import Settlement

    admits: list[float] = []
    settles: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        g = await limiter.admit.remote(key_id, ("m",), 12, 0)
        t1 = time.perf_counter()
        s = Settlement(g.ticket, g.epoch, g.key_id, g.period, g.tokens, g.images, 7, 0)
        await limiter.settle.remote([s])
        admits.append(t1 - t)
        settles.append(time.perf_counter() - t1)
    return {
        "admit_p50_ms": 1000 * statistics.median(admits),
        "settle_p50_ms": 1000 * statistics.median(settles),
    }


# (callers, concurrent calls each, coalesced) of each admissions measurement
CONFIGS = ((1, 1, False), (1, 32, False), (1, 32, True), (4, 32, True))
ONE_AT_A_TIME = 1000  # admissions, each then settled, in the one-at-a-time measurement


def admissions(
    seconds: float,
    responses_kb: int = 0,
    configs: tuple[tuple[int, int, bool], ...] = CONFIGS,
) -> dict[str, Any]:
    """Print each measurement; return them (admissions/s by configuration, the one-at-a-time
    latencies)."""
    import ray

    from voltage_ray.limits.client import get_or_create_limiter
    from voltage_ray.limits.keys import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="voltage_limits_bench_"))
    (tmp / "plans.yaml").write_text(PLANS)
    store = KeyStore(tmp / "v.db")
    key_id = store.create("bench")[0].id
    store.close()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        limiter = get_or_create_limiter(str(tmp / "v.db"), str(tmp / "plans.yaml"))
        ray.get(limiter.ping.remote())

        @ray.remote(num_cpus=0)
        class Caller:
            async def run(
                self, limiter: Any, concurrency: int, secs: float, coalesce: bool
            ) -> dict[str, Any]:
                return await _caller_loop(limiter, key_id, concurrency, secs, coalesce)

            async def one_at_a_time(self, limiter: Any, n: int) -> dict[str, float]:
                return await _one_at_a_time(limiter, key_id, n)

        @ray.remote(num_cpus=0)
        class Storer:
            async def run(self, limiter: Any, kb: int, secs: float) -> int:
                return await _store_loop(limiter, kb, secs)

        caller = Caller.remote()  # type: ignore[attr-defined]
        lone = ray.get(caller.one_at_a_time.remote(limiter, ONE_AT_A_TIME))
        ray.kill(caller)
        result: dict[str, Any] = {**lone, "rates": {}}
        print(
            f"admissions: one at a time, each then settled: admit p50 {lone['admit_p50_ms']:.2f} "
            f"ms, settle p50 {lone['settle_p50_ms']:.2f} ms",
            flush=True,
        )
        total = ONE_AT_A_TIME
        for callers, concurrency, coalesce in configs:
            actors = [Caller.remote() for _ in range(callers)]  # type: ignore[attr-defined]
            ray.get([a.__ray_ready__.remote() for a in actors])
            storer = Storer.remote() if responses_kb else None  # type: ignore[attr-defined]
            if storer is not None:
                ray.get(storer.__ray_ready__.remote())
                stores = storer.run.remote(limiter, responses_kb, seconds)
            runs = [a.run.remote(limiter, concurrency, seconds, coalesce) for a in actors]
            results = ray.get(runs)
            if storer is not None:
                print(
                    f"responses: {ray.get(stores) / seconds:,.0f}/s of {responses_kb} KiB stored "
                    "meanwhile",
                    flush=True,
                )
                ray.kill(storer)
            n = sum(r["admitted"] for r in results)
            total += n
            result["rates"][f"{callers}x{concurrency}{'c' if coalesce else ''}"] = n / seconds
            p50 = max(r["p50_ms"] for r in results)
            p99 = max(r["p99_ms"] for r in results)
            how = "coalesced exchanges" if coalesce else "one admit call each"
            print(
                f"admissions: {callers} caller(s) x {concurrency} concurrent, {how}: "
                f"{n / seconds:,.0f}/s  (admit p50 {p50:.2f} ms, p99 {p99:.2f} ms)",
                flush=True,
            )
            for a in actors:
                ray.kill(a)
        time.sleep(1.0)
        usage = ray.get(limiter.usage.remote(key_id))["limits"]
        exact = usage["requests"]["used"] == total and usage["tokens"]["used"] == 7 * total
        print(
            f"admissions: counted {usage['requests']['used']:,} of {total:,} admitted, "
            f"tokens {usage['tokens']['used']:,} (exact: {exact})",
            flush=True,
        )
        ray.kill(limiter, no_restart=True)
        assert exact, "the limiter's counts differ from what it admitted"
        return result
    finally:
        ray.shutdown()


def against(rev: str, seconds: int, rounds: int) -> None:
    """This checkout's limiter against revision ``rev``'s (e.g. the one before a change), in
    alternating runs of this file's own measurements: only the ``voltage_ray`` package differs
    (``rev``'s, from a git worktree, imported by the driver and, through the working directory
    Ray puts first on its workers' path, by the actors). Prints the medians and the ratios."""
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="voltage_limits_against_"))
    other = tmp / "tree"
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "worktree", "add", "--detach", "-q", str(other), rev], check=True)
    try:
        here = other / "benchmarks" / "limits_against.py"
        shutil.copy(__file__, here)  # this file's measurements, with ``rev``'s package
        runs: dict[str, list[dict[str, Any]]] = {rev: [], "this": []}
        for i in range(rounds):
            for side in (rev, "this") if i % 2 == 0 else ("this", rev):
                root, script = (other, here) if side == rev else (repo, Path(__file__).resolve())
                out = tmp / f"{i}-{'rev' if side == rev else 'this'}.json"
                env = {**os.environ, "PYTHONPATH": str(root)}
                print(f"--- round {i + 1}: {side}", flush=True)
                subprocess.run(
                    [sys.executable, str(script), "--skip-embeddings", "--seconds", str(seconds),
                     "--only-coalesced", "--json", str(out)],
                    cwd=root, env=env, check=True,
                )  # fmt: skip
                runs[side].append(json.loads(out.read_text()))
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(other)], check=False)

    def median(side: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[side])

    rate = {side: statistics.median(r["rates"]["4x32c"] for r in runs[side]) for side in runs}
    print(
        f"against {rev}: 4 coalescing callers, median {rate['this']:,.0f} admissions/s here, "
        f"{rate[rev]:,.0f}/s at {rev}: {rate['this'] / rate[rev]:.2f}x",
        flush=True,
    )
    extra = {f: median("this", f) - median(rev, f) for f in ("admit_p50_ms", "settle_p50_ms")}
    print(
        f"against {rev}: one at a time, p50 admission {median('this', 'admit_p50_ms'):.2f} ms "
        f"({extra['admit_p50_ms']:+.2f}), settlement {median('this', 'settle_p50_ms'):.2f} ms "
        f"({extra['settle_p50_ms']:+.2f}): a request waits {sum(extra.values()):+.2f} ms "
        "for both",
        flush=True,
    )


# --- 2. embeddings, limits on vs off ------------------------------------------------------------


@contextlib.contextmanager
def two_apps(tmp: Path) -> Iterator[tuple[str, str]]:
    """One `serve run` with the embeddings benchmark's app twice, limits on at /on and off at
    /off; yields (base url, key). Both share the cluster, so load from elsewhere hits both alike."""
    from voltage_ray.limits.keys import KeyStore

    (tmp / "plans.yaml").write_text(PLANS)
    store = KeyStore(tmp / "voltage.db")
    key = store.create("bench", "bench")[1]
    store.close()
    port = free_port()
    paths: dict[str, Any] = {"database": str(tmp / "voltage.db"), "plans": str(tmp / "plans.yaml")}
    apps = [
        {
            "name": mode,
            "route_prefix": f"/{mode}",
            "import_path": "voltage_ray.app:build_app",
            "args": app_args(**paths, limits={"enabled": mode == "on"}),
        }
        for mode in ("on", "off")
    ]
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": apps}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env["HF_HUB_OFFLINE"] = "1"
    serve_bin = str(Path(sys.executable).parent / "serve")
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [serve_bin, "run", "--address", "local", str(tmp / "serve.yaml")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while not all(_healthy(f"{base}/{mode}/health") for mode in ("on", "off")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve run failed: see {tmp / 'serve.log'}")
                time.sleep(1)
            yield base, key
        finally:
            stop(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def embeddings(seconds: int, clients: int, rounds: int) -> None:
    """Alternate rounds of the embeddings benchmark's small-request load (one short input per
    request, ``clients`` connections) between the two apps; report the median of each."""
    tmp = Path(tempfile.mkdtemp(prefix="voltage_limits_bench_"))
    with two_apps(tmp) as (base, key):
        for mode in ("on", "off"):  # warm up both, and check the limits are really on and off
            r = httpx.post(
                f"{base}/{mode}/v1/embeddings",
                headers={"X-VoltageGPU-Key": key},
                json={"model": MODEL_NAME, "input": "hello"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert ("x-ratelimit-limit-requests" in r.headers) == (mode == "on"), dict(r.headers)
            wrk_load(f"{base}/{mode}", key, clients=clients, seconds=5)
        one_at_a_time(base, key)
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(rounds):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                load = wrk_load(f"{base}/{mode}", key, clients=clients, seconds=seconds)
                assert load.failed == 0, load
                runs[mode].append(load.requests_per_s)
                print(
                    f"embeddings, limits {mode:>3}: {load.requests_per_s:.1f} req/s, "
                    f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, failed {load.failed}, "
                    f"wrk CPU {load.wrk_cpu_s:.1f} s",
                    flush=True,
                )
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    print(
        f"embeddings: median {on:.1f} req/s with limits, {off:.1f} without: limits cost "
        f"{100 * (1 - on / off):.1f}% of throughput (aim <= 10%)",
        flush=True,
    )


def one_at_a_time(base: str, key: str, requests: int = 400) -> None:
    """Latency with no load: requests one after another, alternating limits on and off."""
    took: dict[str, list[float]] = {"on": [], "off": []}
    body = {"model": MODEL_NAME, "input": "hello"}
    with httpx.Client(headers={"X-VoltageGPU-Key": key}, timeout=60) as c:
        for i in range(requests):
            mode = ("on", "off")[i % 2]
            started = time.perf_counter()
            assert c.post(f"{base}/{mode}/v1/embeddings", json=body).status_code == 200
            took[mode].append(time.perf_counter() - started)
    on, off = statistics.median(took["on"]), statistics.median(took["off"])
    print(
        f"embeddings, one request at a time: p50 {1000 * on:.2f} ms with limits, "
        f"{1000 * off:.2f} ms without: limits add {1000 * (on - off):.2f} ms",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=int, default=15, help="length of each measurement")
    p.add_argument("--clients", type=int, default=64, help="wrk connections")
    p.add_argument("--rounds", type=int, default=3, help="alternating on/off wrk rounds")
    p.add_argument("--skip-actor", action="store_true")
    p.add_argument("--skip-embeddings", action="store_true")
    p.add_argument(
        "--responses-kb", type=int, default=0, help="store responses of this size meanwhile"
    )
    p.add_argument(
        "--against",
        metavar="REV",
        help="compare the limiter with git revision REV's, in alternating runs (--rounds)",
    )
    p.add_argument("--only-coalesced", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # where --against's runs write
    a = p.parse_args()
    if a.against:
        against(a.against, a.seconds, a.rounds)
        return
    if not a.skip_actor:
        configs = CONFIGS[-1:] if a.only_coalesced else CONFIGS
        result = admissions(a.seconds, a.responses_kb, configs)
        if a.json:
            a.json.write_text(json.dumps(result))
    if not a.skip_embeddings:
        embeddings(a.seconds, a.clients, a.rounds)


if __name__ == "__main__":
    main()
