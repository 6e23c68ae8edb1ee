"""Serve's autoscaling on a real app: load raises a chat deployment's replicas, idleness lowers
them, and no request fails while replicas start or drain (short delays in this test's config)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServedApp, run_beside
from tests.integration.test_failover import replica_states, running
from tests.integration.test_limits import settled, wait_for

APP = "voltage-autoscaling"
DEPLOYMENT = "chat-tiny-autoscaling"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def autoscaling_app(served: ServedApp) -> Iterator[str]:
    from ray import serve

    model = {
        "id": "tiny-autoscaling",
        "kind": "chat",
        "source": {"builtin": "tiny-llama"},
        "chat": {"max_num_seqs": 2},
        "deployment": {
            "max_ongoing_requests": 4,
            "ray_actor_options": {"num_cpus": 0.1},
            # One ongoing request per replica is the target: 4 clients ask for 2 replicas.
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 3,
                "look_back_period_s": 2,
                "metrics_interval_s": 0.5,
            },
        },
    }
    yield run_beside(served, {**served.args, "models": [model]}, APP, "/autoscaling")
    serve.delete(APP)


def test_load_adds_a_replica_and_idleness_removes_it_without_a_failed_request(
    served: ServedApp, autoscaling_app: str
) -> None:
    key = served.new_key("test", "autoscaling")
    headers = served.headers(key)
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()
    heavy = threading.Event()
    stop = threading.Event()

    def ask(client: httpx.Client, max_tokens: int, stream: bool) -> None:
        body = {
            "model": "tiny-autoscaling",
            "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
        if not stream:
            r = client.post(CHAT, json=body, headers=headers)
            with lock:
                results.append((r.status_code, r.json()))
            return
        usage: dict[str, Any] = {}
        with client.stream("POST", CHAT, json=body, headers=headers) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
            status = r.status_code
        with lock:
            results.append((status, {"usage": usage}))

    def heavy_client() -> None:
        with httpx.Client(base_url=autoscaling_app, timeout=120) as client:
            while heavy.is_set():
                ask(client, 256, stream=False)

    def light_client() -> None:
        # One request at a time, streamed and not by turns, while replicas come and go.
        with httpx.Client(base_url=autoscaling_app, timeout=120) as client:
            turn = 0
            while not stop.is_set():
                ask(client, 8, stream=bool(turn % 2))
                turn += 1

    assert running(APP, DEPLOYMENT) == 1
    heavy.set()
    workers = [threading.Thread(target=heavy_client) for _ in range(4)]
    workers.append(threading.Thread(target=light_client))
    for w in workers:
        w.start()
    try:
        wait_for(lambda: running(APP, DEPLOYMENT) == 2, timeout=180, every=0.25)
        scaled_up_at = len(results)
        wait_for(lambda: len(results) >= scaled_up_at + 8, timeout=120)  # served by both
        heavy.clear()  # the light client alone: at most one request, the target of one replica
        wait_for(lambda: replica_states(APP, DEPLOYMENT) == {"RUNNING": 1}, timeout=180, every=0.25)
        scaled_down_at = len(results)
        wait_for(lambda: len(results) >= scaled_down_at + 4, timeout=60)
    finally:
        heavy.clear()
        stop.set()
        for w in workers:
            w.join(timeout=180)

    failed = [(status, body) for status, body in results if status != 200]
    assert not failed, failed[:3]
    assert all(body["usage"] for _, body in results), "a stream ended without its usage chunk"
    billed = sum(body["usage"]["total_tokens"] for _, body in results)
    assert settled(key)["limits"]["tokens"]["used"] == billed
