"""Both config profiles build into the intended Serve deployments (the GPU one cannot run here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.app import ConfigError, build_app, load_args, parse_config
from voltage_ray.ingress.builder import bind_ingress

REPO = Path(__file__).resolve().parents[2]


def deployments(path: Path) -> dict[str, Any]:
    """The bound deployments of a profile, as build_app binds them (without build_app's checks
    of what this node has installed: the GPU profile's vllm is not installed here)."""
    app = bind_ingress(parse_config(load_args(path)))
    ingress = app._bound_deployment
    found = {ingress.name: ingress}
    for model_app in ingress.init_args[1].values():
        dep = model_app._bound_deployment
        found[dep.name] = dep
    return found


def test_gpu_profile_asks_fractional_gpus_with_autoscaling() -> None:
    deps = deployments(REPO / "configs" / "gpu.yaml")
    assert set(deps) == {
        "Ingress",
        "chat-Qwen2.5-1.5B-Instruct",
        "embeddings-bge-base-en-v1.5",
        "images-stable-diffusion-v1-5",
    }
    gpus = {name: d.ray_actor_options.get("num_gpus", 0) for name, d in deps.items()}
    assert gpus == {
        "Ingress": 0,
        "chat-Qwen2.5-1.5B-Instruct": 0.5,
        "embeddings-bge-base-en-v1.5": 0.25,
        "images-stable-diffusion-v1-5": 0.5,
    }
    for name, dep in deps.items():
        auto = dep._deployment_config.autoscaling_config
        assert auto is not None and auto.max_replicas > auto.min_replicas >= 1, name
    chat_args = deps["chat-Qwen2.5-1.5B-Instruct"].init_args[0]
    assert chat_args["source"] == {"hub": "Qwen/Qwen2.5-1.5B-Instruct", "revision": None}
    chat = deps["chat-Qwen2.5-1.5B-Instruct"]._deployment_config
    assert chat_args["chat"]["max_num_seqs"] == 32
    # Its rows twice and its share of the queue (4 x 32): every request reaches a replica.
    assert chat.max_ongoing_requests == 2 * 32 + 4 * 32
    assert chat.autoscaling_config.target_ongoing_requests == 32


def test_cpu_default_asks_no_gpu() -> None:
    deps = deployments(REPO / "serve_config.yaml")
    assert len(deps) == 4
    assert all(d.ray_actor_options.get("num_gpus", 0) == 0 for d in deps.values())
    # One replica of each fits a 2-core node; chat's one CPU is llama.cpp's one thread.
    assert sum(d.ray_actor_options["num_cpus"] for d in deps.values()) <= 2
    assert deps["chat-SmolLM2-135M-Instruct"].ray_actor_options["num_cpus"] == 1
    chat = deps["chat-SmolLM2-135M-Instruct"]._deployment_config
    # 16 rows (no headroom row: preemption alone), twice, and the queue (4 x 16): every request
    # reaches the replica.
    assert deps["chat-SmolLM2-135M-Instruct"].init_args[0]["chat"]["headroom_rows"] == 0
    assert chat.max_ongoing_requests == 2 * 16 + 4 * 16
    assert chat.autoscaling_config.target_ongoing_requests == 16


def test_gpu_profile_runs_chat_on_vllm_and_says_when_vllm_is_missing() -> None:
    chat = deployments(REPO / "configs" / "gpu.yaml")["chat-Qwen2.5-1.5B-Instruct"]
    assert chat.init_args[0]["chat"]["engine"] == "vllm"
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match=r"pip install 'voltage_ray\[vllm\]'"):
        build_app(load_args(REPO / "configs" / "gpu.yaml"))


def test_vllm_cpu_profile_runs_its_chat_replica_in_the_vllm_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """configs/vllm-cpu.yaml, built from the checkout: the chat replica asks no GPU and runs in
    .venv-vllm (made absolute, the venv's own python, not its symlink's target)."""
    monkeypatch.chdir(REPO)
    deps = deployments(REPO / "configs" / "vllm-cpu.yaml")
    chat = deps["chat-SmolLM2-135M-Instruct"]
    assert chat.init_args[0]["chat"]["engine"] == "vllm"
    assert chat.ray_actor_options.get("num_gpus", 0) == 0
    python = chat.ray_actor_options["runtime_env"]["py_executable"]
    assert python == str(REPO / ".venv-vllm" / "bin" / "python")
    assert "runtime_env" not in deps["Ingress"].ray_actor_options
