"""Both chat engines over HTTP on a GPU: the same checks against ``engine: transformers`` and
``engine: vllm`` (skipped everywhere without CUDA; the vllm half also without the vllm package).

One app, on this module's own Ray instance (or the one already running), serves two chat models
from the same offline source, tiny-llama (a 2-layer Llama, head_dim 16, 512 positions, built by
voltage_ray), so their prompts, token counts and limits are comparable:

- ``tiny-transformers``: voltage_ray's continuous batching, num_gpus 0.25, bfloat16;
- ``tiny-vllm``: vLLM's AsyncLLM, num_gpus 0.5, gpu_memory_utilization 0.4, max_model_len 512,
  bfloat16 (present only where ``vllm`` imports).

Every check is parametrized over the two model ids and runs through the OpenAI SDK: a JSON
completion (exact prompt token counts, the same on both engines, completion within max_tokens),
an SSE stream (one id, the role only in each choice's first delta, one finish chunk per choice,
the include_usage chunk last, its usage consistent with the streamed choices), n=3 sampled and
n=2 greedy, a stop string, seeded sampling, cancellation (a stream left after a few frames; the
replica's ``info()`` shows it cancelled and nothing active), usage arithmetic and the
context-length 400.
Deterministic comparisons (seed, stop) use a prompt shorter than one vLLM KV block (16 tokens),
so no prefix-cache hit changes the numerics of the second request. ``info()`` of both
deployments (engine, device, dtype) is printed as ``[gpu-check]`` lines.

    bash scripts/gpu_check                          # the GPU host: runs all of tests/gpu
    pytest -s tests/gpu/test_gpu_engines.py         # any CUDA host
    VOLTAGE_GPU_CHECK_ON_CPU=1 pytest -s tests/gpu/test_gpu_engines.py
                                                    # CPU rehearsal: the transformers half, Ray
                                                    # told of one GPU

Environment: VOLTAGE_GPU_CHECK_REQUIRE_CUDA=1 (scripts/gpu_check sets it) fails instead of
skipping when torch sees no CUDA device; VOLTAGE_GPU_CHECK_REQUIRE_VLLM=1, for a GPU bundle that
is expected to bring vllm, fails the vllm half instead of skipping it when vllm is missing.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.cluster import CUDA, ON_CPU, REQUIRE_CUDA, init_ray
from tests.integration.conftest import free_port, wait_healthy

REQUIRE_VLLM = os.environ.get("VOLTAGE_GPU_CHECK_REQUIRE_VLLM") == "1"
VLLM = importlib.util.find_spec("vllm") is not None
WITH_VLLM = VLLM and CUDA  # the app serves the vllm model only where it can start

pytestmark = pytest.mark.skipif(
    not (CUDA or ON_CPU or REQUIRE_CUDA),
    reason="needs a CUDA GPU (VOLTAGE_GPU_CHECK_ON_CPU=1 rehearses the transformers half on a CPU)",
)

APP = "voltage-engines"
PREFIX = "/engines"
TRANSFORMERS = "tiny-transformers"
VLLM_MODEL = "tiny-vllm"
ENGINE_OF = {TRANSFORMERS: "transformers", VLLM_MODEL: "vllm"}
CONTEXT = 512  # tiny-llama's max_position_embeddings; the vllm model's max_model_len
HEALTHY_WITHIN_S = 270.0  # vLLM compiles and captures CUDA graphs at start
PLANS = (
    "plans:\n  test: {requests_per_minute: null, tokens_per_month: null, images_per_month: null}\n"
)

USER = [{"role": "user", "content": "Tell me a story about a fox"}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Tell me about it in one sentence."},
]
# Shorter than one vLLM KV block (16 tokens) with the chat template: a repeated request finds no
# full block in the prefix cache, so both runs compute the same prefill.
SHORT_PROMPTS = ["Hi", "Tell me", "A fox", "Hello"]

ENGINES = [
    pytest.param(TRANSFORMERS, id="transformers"),
    pytest.param(
        VLLM_MODEL,
        id="vllm",
        marks=[
            pytest.mark.skipif(not CUDA, reason="vLLM needs a CUDA GPU (a CPU rehearsal)"),
            pytest.mark.skipif(
                not (VLLM or REQUIRE_VLLM),
                reason="vllm is not installed (VOLTAGE_GPU_CHECK_REQUIRE_VLLM=1 fails instead)",
            ),
        ],
    ),
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- the app -------------------------------------------------------------------------------------


def chat_model(model_id: str, engine: str, num_gpus: float, **chat: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "kind": "chat",
        "source": {"builtin": "tiny-llama"},
        "chat": {"engine": engine, "dtype": "bfloat16", "default_max_tokens": 16, **chat},
        "deployment": {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus},
        },
    }


def engines_args(tmp: Path) -> dict[str, Any]:
    models = [chat_model(TRANSFORMERS, "transformers", 0.25)]
    if WITH_VLLM:
        models.append(
            chat_model(VLLM_MODEL, "vllm", 0.5, gpu_memory_utilization=0.4, max_model_len=CONTEXT)
        )
    return {
        "database": str(tmp / "voltage.db"),
        "plans": str(tmp / "plans.yaml"),
        "cache_dir": str(tmp / "cache"),
        "models": models,
        "ingress": {
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 256,
                "ray_actor_options": {"num_cpus": 0.25},
            }
        },
    }


@dataclass
class EnginesApp:
    base_url: str  # with the route prefix
    key: str
    args: dict[str, Any]
    tokenizer: Any

    def deployment(self, model_id: str) -> str:
        from voltage_ray.config import ModelConfig
        from voltage_ray.deployments.builder import deployment_name

        model = next(m for m in self.args["models"] if m["id"] == model_id)
        return deployment_name(ModelConfig.model_validate(model))

    def info(self, model_id: str) -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle(self.deployment(model_id), app_name=APP)
        return dict(handle.info.remote().result(timeout_s=60))

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The exact prompt length: the model's chat template with the generation prompt."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)


def _http_port(asked: int) -> int:
    """The port Serve's proxy listens on (another one if Serve was already running)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
    except Exception:
        return asked
    return int(client.http_config.port) if client is not None else asked


def _app_state() -> str:
    """Serve's view of the app, for a failure message."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP)
    except Exception as exc:
        return f"(serve.status failed: {exc})"
    if app is None:
        return "(no such app)"
    lines = [f"app {app.status}: {app.message}"]
    for name, dep in app.deployments.items():
        lines.append(f"  {name} {dep.status}: {dep.message[:2000]}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginesApp]:
    import ray
    from ray import serve
    from transformers import AutoConfig, AutoTokenizer

    from voltage_ray.app import build_app
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource
    from voltage_ray.limits.keys import KeyStore

    if not (CUDA or ON_CPU):
        pytest.fail("torch sees no CUDA device (VOLTAGE_GPU_CHECK_REQUIRE_CUDA=1)")
    tmp = tmp_path_factory.mktemp("engines")
    started = time.monotonic()
    # Built once here, before the replicas start: both open the same directory.
    location = materialize(BuiltinSource(builtin="tiny-llama"), tmp / "cache")
    tokenizer = AutoTokenizer.from_pretrained(location)
    config = AutoConfig.from_pretrained(location)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    print(
        f"\n[gpu-check] engines: tiny-llama head_dim {head_dim}, {config.num_attention_heads} "
        f"heads / {config.num_key_value_heads} kv heads, vocab {config.vocab_size}; "
        f"vllm {'installed' if VLLM else 'missing'}; serving "
        + ("both engines" if WITH_VLLM else "transformers only")
    )
    (tmp / "plans.yaml").write_text(PLANS)
    args = engines_args(tmp)
    store = KeyStore(tmp / "voltage.db")
    key = store.create("test", "gpu-engines")[1]
    store.close()

    own_ray = not ray.is_initialized()
    if own_ray:
        init_ray()
    try:
        asked = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": asked})
        base = f"http://127.0.0.1:{_http_port(asked)}{PREFIX}"
        serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
        wait_healthy(base, "the engines app", HEALTHY_WITHIN_S, _app_state)
        print(f"[gpu-check] engines app healthy {time.monotonic() - started:.1f} s after the start")
        yield EnginesApp(base, key, args, tokenizer)
    finally:
        try:
            if own_ray:
                serve.shutdown()
            else:
                serve.delete(APP)
        finally:
            if own_ray:
                ray.shutdown()


@pytest.fixture(scope="module")
def client(app: EnginesApp) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{app.base_url}/v1", api_key=app.key, max_retries=0, timeout=120)


@pytest.fixture(params=ENGINES)
def model(request: pytest.FixtureRequest, app: EnginesApp) -> str:
    """A served model id; the vllm one fails here when vllm is required but missing."""
    model_id = str(request.param)
    if not any(m["id"] == model_id for m in app.args["models"]):
        pytest.fail(f"{model_id} is not served: vllm is missing (VOLTAGE_GPU_CHECK_REQUIRE_VLLM=1)")
    return model_id


SEEDED: dict[str, Any] = {"temperature": 1.0, "seed": 7}


def visible_text(client: Any, model: str, max_tokens: int) -> tuple[list[dict[str, str]], str]:
    """A short prompt whose seeded sampled completion (SEEDED) has at least 6 readable
    characters, and that completion (greedy on the random tiny model repeats one token)."""
    seen = []
    for prompt in SHORT_PROMPTS:
        reply = client.chat.completions.create(
            model=model, messages=ask(prompt), max_tokens=max_tokens, **SEEDED
        )
        text = reply.choices[0].message.content or ""
        if len(text.replace("\ufffd", "").strip()) >= 6:
            return ask(prompt), text
        seen.append(text)
    pytest.fail(f"no short prompt gave a readable seeded completion: {seen!r}")


# --- the checks ----------------------------------------------------------------------------------


def test_engine_info(app: EnginesApp, model: str) -> None:
    info = app.info(model)
    keys = ("engine", "device", "dtype", "context_length", "running", "generations", "cancelled")
    print(f"[gpu-check] {model} info: " + ", ".join(f"{k} {info.get(k)!r}" for k in keys))
    print(f"[gpu-check] {model} info (all): {info}")
    assert info["id"] == model and info["engine"] == ENGINE_OF[model], info
    assert str(info["device"]).startswith("cuda" if CUDA else "cpu"), info
    assert info["dtype"] == "bfloat16", info
    assert info["context_length"] == CONTEXT, info
    assert info["active"] == 0 and info["running"] == 0, info


def test_json_completion(app: EnginesApp, client: Any, model: str) -> None:
    for messages in (USER, CONVERSATION):
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0
        )
        assert reply.object == "chat.completion" and reply.model == model
        assert len(reply.choices) == 1 and reply.choices[0].index == 0
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length"), choice
        usage = reply.usage
        assert usage.prompt_tokens == app.prompt_tokens(messages), usage
        assert 1 <= usage.completion_tokens <= 12, usage
        if choice.finish_reason == "length":
            assert usage.completion_tokens == 12, usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def test_prompt_tokens_agree_across_engines(app: EnginesApp, client: Any) -> None:
    """The same messages cost the same prompt tokens on every served engine (one Prompter)."""
    served = [m["id"] for m in app.args["models"]]
    for messages in (USER, CONVERSATION, ask("Hi")):
        counts = {
            m: client.chat.completions.create(
                model=m, messages=messages, max_tokens=1, temperature=0
            ).usage.prompt_tokens
            for m in served
        }
        print(f"[gpu-check] prompt tokens per engine: {counts}")
        assert set(counts.values()) == {app.prompt_tokens(messages)}, counts


def test_sse_stream(app: EnginesApp, client: Any, model: str) -> None:
    n, max_tokens = 2, 10
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=USER,
            max_tokens=max_tokens,
            n=n,
            temperature=1.0,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    finish: dict[int, str] = {}
    for index in range(n):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine, f"no chunk for choice {index}"
        assert mine[0].delta.role == "assistant"
        assert all(c.delta.role is None for c in mine[1:]), "role after the first delta"
        assert mine[-1].finish_reason in ("stop", "length"), mine[-1]
        assert all(c.finish_reason is None for c in mine[:-1]), "a finish before the last chunk"
        finish[index] = mine[-1].finish_reason
    assert all(len(c.choices) <= 1 for c in chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])  # the usage chunk only, and last
    usage = last.usage
    assert usage.prompt_tokens == app.prompt_tokens(USER), usage
    # The completion is the sum over choices: max_tokens for each that ran to length, 1 to
    # max_tokens for each that stopped.
    lengths = sum(reason == "length" for reason in finish.values())
    low = lengths * max_tokens + (n - lengths)
    assert low <= usage.completion_tokens <= n * max_tokens, (finish, usage)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_n_choices(app: EnginesApp, client: Any, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=USER, max_tokens=8, n=3, temperature=1.0, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert all(isinstance(c.message.content, str) for c in reply.choices)
    assert reply.usage.prompt_tokens == app.prompt_tokens(USER)  # counted once, not n times
    assert 3 <= reply.usage.completion_tokens <= 24, reply.usage


def test_n_greedy_choices(client: Any, model: str) -> None:
    """n > 1 at temperature 0 is a valid request (the API allows it; the choices are equal).
    vLLM's SamplingParams refuses n > 1 with greedy sampling, so the engine has to map it."""
    reply = client.chat.completions.create(
        model=model, messages=ask(SHORT_PROMPTS[0]), max_tokens=8, n=2, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content
    assert 2 <= reply.usage.completion_tokens <= 16, reply.usage


def test_stop_string(client: Any, model: str) -> None:
    messages, base = visible_text(client, model, max_tokens=24)
    # A two-character stop from the readable text past its start (not a replacement char).
    start = next(
        (
            i
            for i in range(2, len(base) - 1)
            if "\ufffd" not in base[i : i + 2] and base[i : i + 2].strip()
        ),
        None,
    )
    if start is None:
        pytest.fail(f"no readable two characters to stop at in {base!r}")
    stop = base[start : start + 2]
    cut = base.index(stop)
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, stop=[stop], **SEEDED
    )
    text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    print(f"[gpu-check] {model} stop {stop!r}: {base!r} -> {text!r} ({reason})")
    assert stop not in text
    assert text == base[:cut], (base, stop, text)  # seeded: the same tokens up to the stop
    assert reason == "stop"


def test_seed_reproducible(client: Any, model: str) -> None:
    kw = dict(model=model, messages=ask(SHORT_PROMPTS[0]), max_tokens=16, temperature=1.0)
    first = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    again = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    other = client.chat.completions.create(**kw, seed=4321).choices[0].message.content
    print(f"[gpu-check] {model} seed 1234 twice: {first!r} / {again!r}; seed 4321: {other!r}")
    assert first == again


def test_cancellation(app: EnginesApp, client: Any, model: str) -> None:
    # A request that runs to max_tokens when left alone (the tiny model may sample its end
    # token early), so the stream is still generating when it is left.
    messages = ask(SHORT_PROMPTS[0])
    kw: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 400}
    candidates: list[dict[str, Any]] = [{"temperature": 0}]
    candidates += [{"temperature": 1.0, "seed": s} for s in range(5)]
    chosen = candidates[0]
    for sampling in candidates:
        began = time.monotonic()
        reply = client.chat.completions.create(**kw, **sampling)
        if reply.choices[0].finish_reason == "length":
            chosen = sampling
            print(
                f"[gpu-check] {model}: {sampling} runs 400 tokens in "
                f"{time.monotonic() - began:.2f} s"
            )
            break
    before = app.info(model)
    stream = client.chat.completions.create(**kw, **chosen, stream=True)
    for frames, chunk in enumerate(stream, start=1):
        assert not (chunk.choices and chunk.choices[0].finish_reason), "finished before leaving"
        if frames >= 3:
            break
    stream.close()  # leave: the connection closes mid-stream
    deadline = time.monotonic() + 30
    info = app.info(model)
    while (info["cancelled"] <= before["cancelled"] or info["active"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
        info = app.info(model)
    print(
        f"[gpu-check] {model} after leaving a stream: cancelled {before['cancelled']} -> "
        f"{info['cancelled']}, active {info['active']}, running {info['running']}"
    )
    assert info["cancelled"] > before["cancelled"], info
    assert info["active"] == 0, info
    deadline = time.monotonic() + 10
    while info["running"] and time.monotonic() < deadline:  # the engine freed its rows
        time.sleep(0.2)
        info = app.info(model)
    assert info["running"] == 0, info


def test_usage_and_context_overflow(app: EnginesApp, client: Any, model: str) -> None:
    import openai

    reply = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=5)
    usage = reply.usage
    assert usage.prompt_tokens == app.prompt_tokens(CONVERSATION)
    assert 1 <= usage.completion_tokens <= 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    long = ask(" ".join(["fox"] * 600))
    assert app.prompt_tokens(long) > CONTEXT
    for extra in ({}, {"max_tokens": 10}, {"max_tokens": 10, "stream": True}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model, messages=long, **extra)
        assert caught.value.status_code == 400
        message = caught.value.response.json()["error"]  # the spec's error body
        assert f"maximum context length is {CONTEXT}" in message, message
    with pytest.raises(openai.BadRequestError) as caught:  # a short prompt, too many tokens
        client.chat.completions.create(model=model, messages=USER, max_tokens=CONTEXT)
    assert caught.value.status_code == 400
    message = caught.value.response.json()["error"]
    assert f"maximum context length is {CONTEXT}" in message, message
