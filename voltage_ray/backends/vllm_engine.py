"""The ``vllm`` chat engine: vLLM's ``AsyncLLM`` behind the same ChatServer (GPU hosts).

vLLM brings paged attention, prefix caching and CUDA graphs; voltage_ray keeps the request side:
prompts are token ids from the model's chat template (:class:`Prompter`, so prompt token counts
and the context check are exact and identical to the transformers engine), and each request's
parameters map onto vLLM's ``SamplingParams`` (:func:`sampling_kwargs`) with delta outputs.
Leaving the stream aborts the vLLM request. vLLM is imported lazily: the CPU install never
needs it (``pip install 'voltage_ray[vllm]'`` on GPU hosts; the version Ray Serve LLM 2.60 pins).
"""

from __future__ import annotations

import importlib.util
import logging
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
)
from voltage_ray.backends.engines import Events
from voltage_ray.backends.fairness import ANONYMOUS, Tenant
from voltage_ray.config import ChatSettings
from voltage_ray.errors import BadRequest

logger = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm==0.29.0"  # what ray[serve,llm]==2.60.0 pins
SHARE_HEADROOM = 0.9  # of the replica's GPU share, left to the engine by default
MIN_TOP_P = 1e-8  # vLLM wants top_p in (0, 1]; top_p 0 keeps only the most likely token


class VLLMUnavailable(RuntimeError):
    """The vllm package is not installed where the engine was asked for."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def sampling_kwargs(p: Prepared) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for a prepared request (output kind and structured
    outputs added apart, as they need vLLM's own classes).

    Greedy is ``temperature 1, top_k 1`` (still the argmax): vLLM refuses ``temperature 0``
    with ``n > 1``, which the transformers engine (and OpenAI) accept. ``logprobs`` is vLLM's
    count of alternatives (the sampled token comes with them); vLLM's default ``raw_logprobs``
    mode reports the distribution the CPU sampler reports: the model's, after the grammar mask,
    before logit_bias, penalties, temperature and top_p.
    """
    greedy = p.temperature == 0
    return {
        "n": p.n,
        "temperature": 1.0 if greedy else p.temperature,
        "top_k": 1 if greedy else -1,
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


def structured_outputs_kwargs(p: Prepared) -> dict[str, Any] | None:
    """``StructuredOutputsParams`` keyword arguments for the request's constraint: the same JSON
    schema (with the same compact whitespace), regex or choice the CPU engines enforce."""
    c = p.constraint
    if c is None:
        return None
    if c.kind == "json_object":
        return {"json_object": True, "disable_any_whitespace": True}
    if c.kind == "regex":
        return {"regex": c.spec}
    if c.kind == "lark":  # vLLM's `grammar` (its guidance backend reads Lark, as llguidance)
        return {"grammar": c.spec}
    if c.kind == "choice":
        return {"choice": c.choices}
    return {"json": c.schema_dict, "disable_any_whitespace": True}


def scored(
    token_ids: Sequence[int], logprobs: Any, k: int, eos_ids: frozenset[int]
) -> list[TokenLogprobs]:
    """vLLM's per-token logprob dicts (token id -> Logprob with ``logprob`` and ``rank``) as
    the engine-neutral :class:`TokenLogprobs`, end-of-sequence tokens left out."""
    out = []
    for token, candidates in zip(token_ids, logprobs or [], strict=False):
        if token in eos_ids:
            continue
        ranked = sorted(
            ((t, lp) for t, lp in candidates.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank,
        )
        top = [(int(t), float(lp.logprob)) for t, lp in ranked[:k]]
        out.append(TokenLogprobs(int(token), float(candidates[token].logprob), top))
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
    """``AsyncEngineArgs`` keyword arguments for a model directory and its settings."""
    return {
        "model": location,
        "tokenizer": location,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len or settings.max_context,
        "gpu_memory_utilization": gpu_memory_utilization(settings, num_gpus),
        "enable_prefix_caching": settings.enable_prefix_caching,
        "max_num_seqs": settings.max_num_seqs,
        "disable_log_stats": True,
        # A plan's priority (higher first) goes to vLLM as its request priority (lower first).
        "scheduling_policy": "priority",
    }


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
                f"({VLLM_REQUIREMENT})"
            )
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.prompter = Prompter(location, settings)
        kwargs = engine_kwargs(location, settings, num_gpus)
        kwargs["max_model_len"] = self.prompter.context_length
        check_free_memory(kwargs["gpu_memory_utilization"])
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.rows = self.requests = 0

    async def stream(self, prepared: Prepared, tenant: Tenant = ANONYMOUS) -> Events:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = structured_outputs_kwargs(prepared)
        params = SamplingParams(
            **sampling_kwargs(prepared),
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        )
        request_id = uuid.uuid4().hex
        used = [0] * prepared.n
        completed = False
        self.rows += prepared.n
        self.requests += 1
        prompt = TokensPrompt(prompt_token_ids=prepared.input_ids)
        outputs = self.engine.generate(prompt, params, request_id, priority=-tenant.priority)
        k, eos = prepared.logprobs, self.prompter.eos_ids
        try:
            async for out in outputs:
                if prepared.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    yield prompt_scored(prepared, out.prompt_logprobs)
                    if prepared.max_tokens == 0:
                        yield Finished([0] * prepared.n, cached_tokens(out))
                        return  # completed stays False: the finally aborts the one token
                events = []
                for o in out.outputs:
                    used[o.index] += len(o.token_ids)
                    reason = o.finish_reason if o.finish_reason in ("stop", "length") else None
                    lps = [] if k is None else scored(o.token_ids, o.logprobs, k, eos)
                    if o.text or reason or lps:
                        events.append(StepEvent(o.index, o.text, reason, used[o.index], lps))
                if events:
                    yield events
                if out.finished:
                    completed = True
                    yield Finished(list(used), cached_tokens(out))
                    return
        except ValueError as exc:  # vLLM's own validation (VLLMValidationError): the request's
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
        return {"device": "cuda", "dtype": self.dtype}

    @property
    def alive(self) -> bool:
        return not self.engine.errored

    def shutdown(self) -> None:
        self.engine.shutdown()


def cached_tokens(out: Any) -> int:
    """Prompt tokens vLLM's prefix cache held (``RequestOutput.num_cached_tokens``)."""
    return int(getattr(out, "num_cached_tokens", None) or 0)
