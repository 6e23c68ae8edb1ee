"""Chat completions end to end: real Serve app, real HTTP, the real OpenAI SDK, a tiny model."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServedApp

USER = [{"role": "user", "content": "Tell me a story about a fox"}]


def sdk(served: ServedApp, prefix: str = "/v1", **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + prefix, api_key=served.key, **kw)


@pytest.mark.parametrize("prefix", ["/v1", "/api/voltage/v1"])
def test_sdk_completion_on_both_prefixes(served: ServedApp, prefix: str) -> None:
    r = sdk(served, prefix).chat.completions.create(model="gpt-4", messages=USER, max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "tiny-chat"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_counts_real_tokens(served: ServedApp) -> None:
    from transformers import AutoTokenizer

    from tests.integration.conftest import CACHE_DIR
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource

    tok = AutoTokenizer.from_pretrained(materialize(BuiltinSource(builtin="tiny-llama"), CACHE_DIR))
    expected = len(
        tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    r = sdk(served).chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=5, temperature=0
    )
    assert r.usage.prompt_tokens == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(tok.encode(r.choices[0].message.content, add_special_tokens=False)) <= 5 + 1


def test_n_choices_and_seed_reproducibility(served: ServedApp) -> None:
    client = sdk(served)
    kw = dict(model="gpt-4", messages=USER, max_tokens=12, n=3, temperature=1.0, seed=42)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # sampled, not copies
    assert 3 <= a.usage.completion_tokens <= 36


def test_stop_string_is_not_returned_and_finishes_with_stop(served: ServedApp) -> None:
    client = sdk(served)
    base = (
        client.chat.completions.create(
            model="gpt-4", messages=USER, max_tokens=20, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
    )
    visible = base.strip()
    assert len(visible) >= 4, base
    cut = base.index(visible[2:4])
    r = client.chat.completions.create(
        model="gpt-4", messages=USER, max_tokens=20, temperature=1.0, seed=7, stop=[visible[2:4]]
    )
    assert r.choices[0].message.content == base[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_penalties_change_sampling(served: ServedApp) -> None:
    client = sdk(served)
    kw = dict(model="gpt-4", messages=USER, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    penalized = (
        client.chat.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
        .choices[0]
        .message.content
    )
    assert plain != penalized


def test_streaming_with_the_sdk(served: ServedApp) -> None:
    stream = sdk(served).chat.completions.create(
        model="gpt-4",
        messages=USER,
        max_tokens=10,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].choices[0].delta.role == "assistant"
        assert mine[-1].choices[0].finish_reason in ("stop", "length")
        assert all(c.choices[0].finish_reason is None for c in mine[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 20
    assert all(c.usage is None for c in chunks[:-1])


def test_a_client_leaving_after_done_does_not_stall_the_next_request(served: ServedApp) -> None:
    """The OpenAI SDK stops reading at ``[DONE]`` and leaves when it is closed: Serve cancels
    that request. The limiter client's loop, started by whichever request came first, once made
    its calls as that request's children, so Ray cancelled them with it and the next request
    hung (seen when this file's streaming tests were the app's first requests)."""
    client = sdk(served)
    stream = client.chat.completions.create(
        model="gpt-4", messages=USER, max_tokens=10, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert list(stream)[-1].usage is not None
    client.close()
    body = {"model": "gpt-4", "messages": USER, "max_tokens": 6, "stream": True}
    started = time.monotonic()
    with (
        served.client() as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=served.headers()) as r,
    ):
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert time.monotonic() - started < 20


def test_raw_sse_frames(served: ServedApp) -> None:
    body = {"model": "gpt-4", "messages": USER, "max_tokens": 6, "stream": True}
    with (
        served.client() as c,
        c.stream(
            "POST", "/api/voltage/v1/chat/completions", json=body, headers=served.headers()
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in p for p in payloads)  # not asked for: not sent
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_async_sdk_concurrent_requests(served: ServedApp) -> None:
    client = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=served.key)
    results = await asyncio.gather(
        *[
            client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=4)
            for _ in range(6)
        ]
    )
    assert len({r.id for r in results}) == 6
    stream = await client.chat.completions.create(
        model="gpt-4", messages=USER, max_tokens=4, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert isinstance(text, str)


def test_context_length_overflow_is_a_400(served: ServedApp) -> None:
    long = [{"role": "user", "content": " ".join(["fox"] * 2100)}]
    with served.client() as c:
        for extra in ({}, {"max_tokens": 10}, {"max_tokens": 10, "stream": True}):
            r = c.post(
                "/v1/chat/completions",
                headers=served.headers(),
                json={"model": "gpt-4", "messages": long, **extra},
            )
            assert r.status_code == 400, r.text
            assert "maximum context length is 2048" in r.json()["error"]
        r = c.post(
            "/v1/chat/completions",
            headers=served.headers(),
            json={"model": "gpt-4", "messages": USER, "max_tokens": 2100},
        )
        assert r.status_code == 400


async def test_client_disconnect_cancels_generation(served: ServedApp) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("chat-tiny-chat", app_name="voltage")
    before = (await handle.info.remote())["cancelled"]
    body = {
        "model": "gpt-4",
        "messages": USER,
        "max_tokens": 400,
        "stream": True,
        # Greedy: the same long answer every time (sampled, the random model may end on an early
        # EOS before the hang-up, and nothing is left to cancel).
        "temperature": 0,
    }
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=served.headers()) as r,
    ):
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if n > 3:
                break
    deadline = time.monotonic() + 15
    info = await handle.info.remote()
    while info["cancelled"] <= before and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        info = await handle.info.remote()
    assert info["cancelled"] > before
    assert info["active"] == 0
    # What the hang-up cut short: the same request, read to its end, is far longer.
    async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as c:
        whole = await c.post(
            "/v1/chat/completions", json={**body, "stream": False}, headers=served.headers()
        )
    assert whole.json()["usage"]["completion_tokens"] >= 100, whole.json()["usage"]


def test_model_deployment_is_usable_through_its_handle(served: ServedApp) -> None:
    from ray import serve

    from voltage_ray.protocol.chat import ChatCompletionChunk, ChatCompletionResponse

    handle = serve.get_deployment_handle("chat-tiny-chat", app_name="voltage")
    request = {"model": "tiny-chat", "messages": USER, "max_tokens": 3}
    response = handle.chat.remote(request).result()
    assert isinstance(response, ChatCompletionResponse)
    assert response.usage.completion_tokens <= 3
    chunks = list(handle.options(stream=True).chat_stream.remote(request))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 3


def test_a_batched_handle_stream_carries_the_same_chunks_in_fewer_items(
    served: ServedApp,
) -> None:
    """``batch_ms`` (what the ingress passes: the model's ``chat.stream_interval_ms``): lists of
    chunks, the role chunk and first token in the first; the same chunks as one by one."""
    from ray import serve

    handle = serve.get_deployment_handle("chat-tiny-chat", app_name="voltage").options(stream=True)
    request = {"model": "tiny-chat", "messages": USER, "max_tokens": 16, "seed": 7}
    single = list(handle.chat_stream.remote(request))
    lists = list(handle.chat_stream.remote(request, None, None, 1000.0))
    assert all(isinstance(item, list) for item in lists)
    flat = [chunk for item in lists for chunk in item]

    def text(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(flat) == text(single) and len(flat) == len(single) > 3
    assert flat[-1].usage == single[-1].usage
    assert len(lists) < len(single)  # a 1 s interval: the tiny model's tokens came together
    first = lists[0]
    assert first[0].choices[0].delta.role == "assistant" and len(first) >= 2  # with a token


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "stream": True}),
        ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 4}),
        ("/v1/completions", {"prompt": "one", "max_tokens": 4, "stream": True}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 16, "store": False}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 16, "stream": True}),
    ],
)
async def test_a_request_is_tokenized_once(
    served: ServedApp, path: str, body: dict[str, object]
) -> None:
    """Admission's tokenizing call hands the replica's work to the generation call: the
    template, the tokens and the grammar are made once per request (the replica counts)."""
    from ray import serve

    handle = serve.get_deployment_handle("chat-tiny-chat", app_name="voltage")
    before = (await handle.info.remote())["tokenized"]
    async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as c:
        r = await c.post(path, json={"model": "tiny-chat", **body}, headers=served.headers())
        assert r.status_code == 200, r.text
    assert (await handle.info.remote())["tokenized"] == before + 1
