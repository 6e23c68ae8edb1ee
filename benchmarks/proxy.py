"""Ray Serve's default HTTP proxy against HAProxy + throughput-optimized mode, on this machine.

    .venv/bin/python benchmarks/proxy.py [--seconds 10] [--connections 64]

Both runs serve the same voltage_ray app (the tiny chat model); the load is `GET /v1/models`,
which crosses the proxy, the ingress and one limiter-actor call, so it measures the request path
itself, not a model. In each mode it also checks what must keep working: SSE streaming, a call
composed through a model deployment, and error bodies. Prints requests/s per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import HA_PROXY_ENV, App, serve_app, wrk

ARGS: dict[str, Any] = {
    "models": [
        {
            "id": "tiny-chat",
            "kind": "chat",
            "aliases": ["gpt-4"],
            "source": {"builtin": "tiny-llama"},
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
        }
    ],
    "ingress": {
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 1024,
            "ray_actor_options": {"num_cpus": 0.1},
        }
    },
}


def checks(app: App) -> dict[str, bool]:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client(base_url=app.base_url, headers=app.headers(), timeout=60) as c:
        plain = c.post("/v1/chat/completions", json=body)
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        bad = c.post("/v1/chat/completions", json={**body, "temperature": 9})
        unknown = c.post("/v1/chat/completions", json={**body, "model": "nope"})
    return {
        "composition": plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] > 0,
        "streaming": bool(lines)
        and lines[-1] == "data: [DONE]"
        and all(json.loads(x[6:])["object"] == "chat.completion.chunk" for x in lines[:-1]),
        "errors": bad.status_code == 400
        and bad.json()["details"]["status"] == 400
        and unknown.status_code == 404,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    a = p.parse_args()
    results = {}
    for mode, env in (("default proxy", {}), ("HAProxy + throughput-optimized", HA_PROXY_ENV)):
        with serve_app(ARGS, env=env) as app:
            ok = checks(app)
            url = app.base_url + "/v1/models"
            wrk(url, app.headers(), connections=8, seconds=3)  # warm up
            r = wrk(url, app.headers(), connections=a.connections, seconds=a.seconds)
        results[mode] = r
        print(
            f"{mode:32s} {r['rps']:8.0f} req/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:7.1f} ms"
            f"  non-2xx {r['non2xx']:.0f}  checks {ok}"
        )
    base, fast = results["default proxy"]["rps"], results["HAProxy + throughput-optimized"]["rps"]
    print(f"ratio HAProxy/default: {fast / base:.2f}x")


if __name__ == "__main__":
    main()
