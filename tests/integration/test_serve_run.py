"""Smoke test: start the service as README says (`voltage-ray serve`), use it, stop it.

Runs the real default config (SmolLM2 from its GGUF wheel, MiniLM, tiny-sd) in HAProxy +
throughput-optimized mode, on an empty key store so the bootstrap key is printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import CACHE_DIR, REPO, free_port, wait_key_live
from tests.integration.test_limits import usage_row
from voltage_ray.limits.keys import KeyStore

LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
KEY_RE = re.compile(r"\b(vr_[0-9a-f]{12}_[A-Za-z0-9_-]{20,})")


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("serve_run")
    port, metrics_port = free_port(), free_port()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "VOLTAGE_DB": str(tmp / "voltage.db"),
        "VOLTAGE_CACHE": str(CACHE_DIR),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "voltage-ray"),
            "serve",
            "--config",
            str(tmp / "serve_config.yaml"),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, "".join(lines[-50:])
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "".join(lines[-50:])
            time.sleep(1)
        yield base, proc, lines, f"http://127.0.0.1:{metrics_port}/metrics", tmp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def bootstrap_key(lines: list[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [m.group(1) for line in list(lines) for m in [KEY_RE.search(line)] if m]
        if found:
            assert len(set(found)) == 1
            return found[0]
        time.sleep(0.5)
    raise AssertionError("no bootstrap key printed")


def test_serve_run_as_a_user(started) -> None:  # type: ignore[no-untyped-def]
    base, _, lines, _, _ = started
    key = bootstrap_key(lines)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    reply = client.chat.completions.create(
        model="gpt-4",
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        temperature=0,
        max_tokens=24,
    )
    # the real SmolLM2 answers (llama.cpp engine; see test_chat_batching on near-ties)
    assert "Rayleigh" in reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="gpt-4",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    emb = client.embeddings.create(model="text-embedding-ada-002", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    img = client.images.generate(
        prompt="a fox",
        size="256x256",
        response_format="b64_json",
        extra_body={"num_inference_steps": 10},
    )
    assert img.data[0].b64_json


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(LABEL_RE.findall(head))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_count_exactly_the_requests_sent(started) -> None:  # type: ignore[no-untyped-def]
    base, _, _, metrics, tmp = started
    store = KeyStore(tmp / "voltage.db")
    key = store.create("pro", "metrics")[1]  # no earlier request has plan="pro"
    store.close()
    wait_key_live([base], key)
    ok = {"endpoint": "/embeddings", "model": "all-MiniLM-L6-v2", "status": "200", "plan": "pro"}
    denied = {"endpoint": "/embeddings", "status": "401"}  # the first 401s of this service
    before = {
        "ok": scrape(metrics, "ray_voltage_requests_total", **ok),
        "denied": scrape(metrics, "ray_voltage_requests_total", **denied),
        "tokens": scrape(metrics, "ray_voltage_prompt_tokens_total", plan="pro"),
        "latency": scrape(metrics, "ray_voltage_request_latency_seconds_count", **ok),
        "no key": scrape(metrics, "ray_voltage_auth_failures_total", reason="missing"),
    }
    tokens = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(5):
            r = client.post(
                "/v1/embeddings",
                json={"model": "text-embedding-ada-002", "input": f"count me {i}"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200
            tokens += r.json()["usage"]["prompt_tokens"]
        for _ in range(2):
            r = client.post("/v1/embeddings", json={"model": "x", "input": "a"})
            assert r.status_code == 401
    want = {"ok": 5.0, "denied": 2.0, "tokens": float(tokens), "latency": 5.0, "no key": 2.0}

    def moved() -> dict[str, float]:
        return {
            "ok": scrape(metrics, "ray_voltage_requests_total", **ok) - before["ok"],
            "denied": scrape(metrics, "ray_voltage_requests_total", **denied) - before["denied"],
            "tokens": scrape(metrics, "ray_voltage_prompt_tokens_total", plan="pro")
            - before["tokens"],
            "latency": scrape(metrics, "ray_voltage_request_latency_seconds_count", **ok)
            - before["latency"],
            "no key": scrape(metrics, "ray_voltage_auth_failures_total", reason="missing")
            - before["no key"],
        }

    deadline = time.monotonic() + 90  # Ray exports every few seconds
    while (got := moved()) != want and time.monotonic() < deadline:
        time.sleep(1)
    assert got == want
    text = httpx.get(metrics, timeout=10).text
    for name in ("ray_voltage_batch_size_bucket", "ray_voltage_queue_wait_seconds_bucket"):
        assert f"{name}{{" in text and 'kind="embeddings"' in text, name
    assert "ray_serve_" in text  # Serve's own metrics on the same port


def test_sigterm_drains_requests_in_flight(started) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM as README says: requests in flight finish, new ones get a 503, usage is written,
    and the process exits cleanly."""
    base, proc, lines, _, tmp = started
    store = KeyStore(tmp / "voltage.db")
    record, key = store.create("enterprise", "drain")
    store.close()
    wait_key_live([base], key)
    headers = {"X-VoltageGPU-Key": key}
    chat = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": "Write a long story about a fox"}],
        "max_tokens": 120,
        "temperature": 0,  # the same long answer every run: both still generating at SIGTERM
    }
    results: dict[str, Any] = {}
    streaming = threading.Event()

    def json_call() -> None:
        r = httpx.post(base + "/v1/chat/completions", json=chat, headers=headers, timeout=120)
        results["json"] = r

    def stream_call() -> None:
        body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        frames = []
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    frames.append(line)
                    streaming.set()
        results["stream"] = frames

    threads = [threading.Thread(target=json_call), threading.Thread(target=stream_call)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    assert streaming.wait(60)  # both admitted (the JSON one first) and generating
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = httpx.post(
        base + "/v1/embeddings",
        json={"model": "text-embedding-ada-002", "input": "too late"},
        headers=headers,
        timeout=30,
    )
    assert late.status_code == 503 and late.json()["details"]["status"] == 503
    assert late.headers["retry-after"]
    for t in threads:
        t.join(timeout=120)
    assert results["json"].status_code == 200
    frames = results["stream"]
    assert frames[-1] == "data: [DONE]"
    usage = json.loads(frames[-2].removeprefix("data: "))["usage"]
    assert proc.wait(timeout=180) == 0
    output = "".join(lines)
    assert "Traceback" not in output
    assert "draining 2 request(s) in flight" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=3)
    # Every token of both requests is in the database; the refused one added nothing.
    row = usage_row(tmp / "voltage.db", record.id)
    spent = results["json"].json()["usage"]["total_tokens"] + usage["total_tokens"]
    assert row is not None and row[:2] == (2, spent)
