"""Which chat engine serves a model: the one its config names, with ``auto`` resolved.

``auto`` (the default) is ``llama_cpp`` for a GGUF source on a replica without GPUs, when the
llama.cpp binding is installed, and ``transformers`` otherwise. A model that names ``llama_cpp``
where the binding is missing (``pip install .`` without ``scripts/install``) is served by the
transformers engine instead, with a warning that says how to get llama.cpp: it still answers,
several times slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from voltage_ray.backends.engines import ChatBackend, TransformersBackend
from voltage_ray.backends.fairness import Tenant
from voltage_ray.backends.sources import gguf_file, materialize, materialize_tokenizer
from voltage_ray.config import GGUFSource, ModelConfig

logger = logging.getLogger(__name__)


def engine_for(model: ModelConfig) -> str:
    """The engine that will serve ``model`` on this node: transformers, llama_cpp or vllm."""
    from voltage_ray.backends.llama_cpp import llama_cpp_unavailable

    assert model.chat is not None
    engine = model.chat.engine
    gguf = isinstance(model.source, GGUFSource)
    on_cpu = model.deployment.ray_actor_options.num_gpus == 0
    if engine == "auto":
        fast = gguf and on_cpu and llama_cpp_unavailable() is None
        engine = "llama_cpp" if fast else "transformers"
    if engine == "llama_cpp":
        reason = llama_cpp_unavailable() if gguf else "its source is not a GGUF file"
        if reason is not None:
            logger.warning(
                "chat model %s asks for the llama_cpp engine, but %s: serving it with the "
                "transformers engine instead (several times slower on CPU)",
                model.id,
                reason,
            )
            engine = "transformers"
    return engine


def build_backend(
    model: ModelConfig,
    cache_dir: Path,
    on_step: Callable[[int], None] | None = None,
    on_admit: Callable[[float, Tenant], None] | None = None,
) -> ChatBackend:
    """The engine for ``model``, loaded. ``on_step`` hears each decode step's batch size and
    ``on_admit`` each request's wait for a row and its tenant (voltage_ray's schedulers; vLLM
    reports both in its own metrics). The replica's share of the model's
    ``max_queued_requests`` bounds the requests waiting in it (``ModelConfig.replica_queue``)."""
    settings = model.chat
    assert settings is not None
    options = model.deployment.ray_actor_options
    max_queued = model.replica_queue
    engine = engine_for(model)
    if engine == "llama_cpp":
        from voltage_ray.backends.llama_cpp_engine import LlamaCppBackend

        assert isinstance(model.source, GGUFSource)
        tokenizer = materialize_tokenizer(model.source, cache_dir)
        path = str(gguf_file(model.source))
        return LlamaCppBackend(
            path, tokenizer, settings, options.num_cpus, on_step, on_admit, max_queued
        )
    location = materialize(model.source, cache_dir)
    if engine == "vllm":
        from voltage_ray.backends.vllm_engine import VLLMBackend

        return VLLMBackend(location, settings, options.num_gpus)
    return TransformersBackend(location, settings, on_step, on_admit, max_queued)
