"""Start a real voltage_ray app with `serve run` in a subprocess, for benchmarks.

Each app gets its own local Ray cluster, a free port, a temporary database with one key, and is
stopped with SIGTERM at the end, as a user would stop `serve run`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HA_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class App:
    base_url: str
    key: str
    tmp: Path
    pid: int

    def headers(self) -> dict[str, str]:
        return {"X-VoltageGPU-Key": self.key}


@contextlib.contextmanager
def serve_app(
    args: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    plan: str = "enterprise",
    plans_text: str | None = None,
    timeout_s: float = 900,
) -> Iterator[App]:
    """Run `serve run` on a config holding ``args``; yield once /health is 200.

    The key made for the run has ``plan``; ``plans_text`` replaces configs/plans.yaml.
    """
    from voltage_ray.limits.keys import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="voltage_bench_"))
    port = free_port()
    plans = REPO / "configs" / "plans.yaml"
    if plans_text is not None:
        plans = tmp / "plans.yaml"
        plans.write_text(plans_text)
    args = {"database": str(tmp / "voltage.db"), "plans": str(plans), **args}
    store = KeyStore(args["database"])
    key = store.create(plan, "bench")[1]
    store.close()
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "voltage",
                "route_prefix": "/",
                "import_path": "voltage_ray.app:build_app",
                "args": args,
            }
        ],
    }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    full_env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed after the process, in finally
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", "local", str(tmp / "serve.yaml")],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited: see {tmp / 'serve.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"app not healthy in {timeout_s}s: see {tmp / 'serve.log'}")
            time.sleep(1)
        yield App(base, key, tmp, proc.pid)
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop `serve run` as a user would (SIGTERM), killing its process group if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wrk(
    url: str,
    headers: dict[str, str],
    *,
    connections: int,
    seconds: int,
    lua: str | None = None,
    threads: int = 1,
) -> dict[str, float]:
    """Run wrk against ``url``; requests/s and latency percentiles (ms)."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    script = None
    if lua:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        script.write(lua)
        script.close()
        cmd += ["-s", script.name]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, float]:
    result: dict[str, float] = {"non2xx": 0.0, "errors": 0.0}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(parts[1])
        elif parts[:1] and parts[0] in ("50%", "90%", "99%"):
            result["p" + parts[0].rstrip("%")] = _ms(parts[1])
        elif "Non-2xx or 3xx responses:" in line:
            result["non2xx"] = float(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            result["errors"] = float(
                sum(int(p.strip(",")) for p in parts if p.strip(",").isdigit())
            )
        elif "requests in" in line:
            result["requests"] = float(parts[0])
    return result


def _ms(value: str) -> float:
    for suffix, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60000.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)
