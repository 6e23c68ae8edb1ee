"""The vllm engine's pure parts (run everywhere) and, where vllm is installed, SamplingParams."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from tests.unit.chat_requests import prepared
from voltage_ray.backends.grammar import Constraint
from voltage_ray.backends.vllm_engine import (
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
    assert structured_outputs_kwargs(p) == {"json": schema, "disable_any_whitespace": True}
    any_object = prepared(constraint=Constraint.of("json_object", {"type": "object"}, "x"))
    assert structured_outputs_kwargs(any_object) == {
        "json_object": True,
        "disable_any_whitespace": True,
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
    # argmax, in a form vLLM accepts with n > 1 (it refuses temperature 0 there)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["n"]) == (
        1.0,
        1,
        1.0,
        3,
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
    assert kwargs["dtype"] == "bfloat16"


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
    no_gpu = vllm_model() | {"deployment": {"ray_actor_options": {"num_gpus": 0}}}
    with pytest.raises(ValidationError, match="engine vllm needs a GPU"):
        ModelConfig.model_validate(no_gpu)
    with pytest.raises(ValidationError, match="exceeds the replica's GPU share"):
        ModelConfig.model_validate(vllm_model(gpu_memory_utilization=0.8))


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

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    settings = ChatSettings(engine="vllm", max_num_seqs=32, max_model_len=4096, dtype="bfloat16")
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(engine_kwargs("/models/qwen", settings, 0.25)) <= fields  # no unknown argument
    assert list(inspect.signature(AsyncLLM.generate).parameters)[1:4] == [
        "prompt",
        "sampling_params",
        "request_id",
    ]
    assert "request_id" in inspect.signature(AsyncLLM.abort).parameters
    assert "engine_args" in inspect.signature(AsyncLLM.from_engine_args).parameters
    assert TokensPrompt(prompt_token_ids=[1, 2])["prompt_token_ids"] == [1, 2]
