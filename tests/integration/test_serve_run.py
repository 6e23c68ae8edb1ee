"""Smoke test: start the service as README says (`voltage-ray serve`), use it, stop it.

Runs the real default config (SmolLM2 from its GGUF wheel, MiniLM, tiny-sd) in HAProxy +
throughput-optimized mode, on an empty key store so the bootstrap key is printed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import CACHE_DIR, REPO, free_port

KEY_RE = re.compile(r"\b(vr_[0-9a-f]{12}_[A-Za-z0-9_-]{20,})")


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("serve_run")
    port = free_port()
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
            "--address",
            "local",
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
        yield base, proc, lines
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
    base, proc, lines = started
    key = bootstrap_key(lines)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    reply = client.chat.completions.create(
        model="gpt-4",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in reply.choices[0].message.content  # the real SmolLM2 answers
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

    # A stop with SIGTERM, as README says: the process and its Ray cluster go away cleanly.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=3)
