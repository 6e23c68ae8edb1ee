"""Real responses of the served app, held against OpenAI's own OpenAPI schemas.

Every JSON body and every stream chunk, as it comes over the wire (httpx, not the SDK's lenient
models), validates against the schema OpenAI publishes for it (tests/schemas, see its README).
Chat answers with tool calls and logprobs, and legacy completions (JSON and stream chunks, echo
and logprobs) included.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import ServedApp
from tests.openai_schema import assert_completion_conforms, assert_conforms

USER = [{"role": "user", "content": "Name three colours"}]


@pytest.fixture(scope="module")
def client(served: ServedApp) -> Iterator[httpx.Client]:
    with served.client(headers=served.headers()) as c:
        yield c


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(client: httpx.Client, body: dict[str, Any]) -> list[Any]:
    """Every `data:` payload of a chat stream, parsed, up to `[DONE]` (which must end it)."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        payloads = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(p) for p in payloads[:-1]]


def test_chat_completion(client: httpx.Client) -> None:
    body = post(client, "/v1/chat/completions", {"model": "gpt-4", "messages": USER, "n": 2})
    assert_conforms("CreateChatCompletionResponse", body)


def test_chat_completion_with_tool_calls_and_logprobs(client: httpx.Client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
            },
        },
    }
    request = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [tool],
        "tool_choice": "required",
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 60,
        "temperature": 0,
    }
    body = post(client, "/v1/chat/completions", request)
    assert body["choices"][0]["message"]["tool_calls"], body
    assert_conforms("CreateChatCompletionResponse", body)
    chunks = stream_chunks(client, request)
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)


@pytest.mark.parametrize("stream", [False, True])
def test_completions(client: httpx.Client, stream: bool) -> None:
    request = {
        "model": "smol",
        "prompt": ["The sky is", "Two plus two is"],
        "max_tokens": 5,
        "n": 2,
        "logprobs": 2,
        "echo": True,
        "temperature": 0.7,
        "seed": 1,
    }
    if not stream:
        body = post(client, "/v1/completions", request)
        assert len(body["choices"]) == 4
        assert_completion_conforms(body, echo=True)
        return
    request["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        payloads = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    for chunk in chunks:
        assert_completion_conforms(chunk, chunk=True, echo=True)


@pytest.mark.parametrize("include_usage", [None, False, True])
def test_chat_stream_chunks(client: httpx.Client, include_usage: bool | None) -> None:
    request: dict[str, Any] = {"model": "gpt-4", "messages": USER, "max_tokens": 6, "n": 2}
    if include_usage is not None:
        request["stream_options"] = {"include_usage": include_usage}
    chunks = stream_chunks(client, request)
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    usage = [chunk for chunk in chunks if chunk.get("usage")]
    if include_usage:  # the last chunk alone carries usage, with no choices
        assert usage == [chunks[-1]] and chunks[-1]["choices"] == []
    else:
        assert not usage


def sdk_view(body: dict[str, Any]) -> dict[str, Any]:
    """An embeddings body as OpenAI's SDK reads it: base64 vectors decoded to floats.

    OpenAI's document types `embedding` as an array of numbers only, while its API (and this one)
    sends a base64 string of little-endian float32 for `encoding_format: base64`, which the SDK
    decodes; the decoded body is what can be held against the schema."""
    data = []
    for item in body["data"]:
        vector = item["embedding"]
        if isinstance(vector, str):
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist()
        data.append({**item, "embedding": vector})
    return {**body, "data": data}


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings(client: httpx.Client, encoding_format: str) -> None:
    request = {
        "model": "text-embedding-ada-002",
        "input": ["red", "green"],
        "encoding_format": encoding_format,
    }
    body = post(client, "/v1/embeddings", request)
    kind = str if encoding_format == "base64" else list
    assert all(isinstance(item["embedding"], kind) for item in body["data"]), body["data"][0]
    assert_conforms("CreateEmbeddingResponse", sdk_view(body))


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_images(client: httpx.Client, response_format: str) -> None:
    request = {
        "prompt": "A red square",
        "size": "256x256",
        "num_inference_steps": 10,
        "response_format": response_format,
    }
    body = post(client, "/v1/images/generations", request)
    assert [set(item) for item in body["data"]] == [{response_format}]
    assert_conforms("ImagesResponse", body)


def test_models(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert_conforms("ListModelsResponse", listing)
    assert len(listing["data"]) >= 3
    for card in listing["data"]:
        one = client.get(f"/v1/models/{card['id']}")
        assert one.status_code == 200, one.text
        assert_conforms("Model", one.json())
