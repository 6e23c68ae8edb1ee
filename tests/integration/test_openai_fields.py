"""The fields OpenAI documents, on every endpoint: those that ask nothing this server's output
depends on are accepted (200) and ignored, those it cannot honour are a 400 naming the field,
truly unknown names are a 400 (OpenAI's behaviour) unless ``ingress.unknown_fields: ignore``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServedApp, run_beside

USER = [{"role": "user", "content": "hi"}]
CHAT = ("/v1/chat/completions", {"model": "tiny-chat", "messages": USER, "max_tokens": 2})
COMPLETIONS = ("/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})
EMBEDDINGS = ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "hi"})
IMAGE = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 10}
IMAGES = ("/v1/images/generations", {**IMAGE, "response_format": "b64_json"})

ACCEPTED = [
    (
        CHAT,
        {
            "store": False,
            "metadata": {"team": "search"},
            "service_tier": "auto",
            "prompt_cache_key": "k1",
            "prompt_cache_retention": "24h",
            "prompt_cache_options": {"ttl": "1h"},
            "safety_identifier": "user-1",
            "moderation": {"model": "omni-moderation-latest"},
            "modalities": ["text"],
            "reasoning_effort": "none",
            "verbosity": "medium",
            "user": "u",
        },
    ),
    (COMPLETIONS, {"user": "u", "best_of": 1, "echo": False, "suffix": None}),
    (EMBEDDINGS, {"user": "u", "encoding_format": "float"}),
    (
        IMAGES,
        {
            "quality": "hd",
            "style": "natural",
            "moderation": "low",
            "background": "opaque",
            "output_format": "png",
            "output_compression": 100,
            "partial_images": 0,
            "stream": False,
            "user": "u",
        },
    ),
]

REFUSED = [
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "prediction", {"type": "content", "content": "hello"}),
    (CHAT, "web_search_options", {}),
    (CHAT, "reasoning_effort", "high"),
    (CHAT, "verbosity", "low"),
    (CHAT, "functions", [{"name": "f", "parameters": {"type": "object"}}]),
    (CHAT, "function_call", "auto"),
    (COMPLETIONS, "suffix", "the end"),
    (COMPLETIONS, "best_of", 3),
    (IMAGES, "background", "transparent"),
    (IMAGES, "output_format", "webp"),
    (IMAGES, "output_compression", 80),
    (IMAGES, "partial_images", 2),
    (IMAGES, "stream", True),
]
ENDPOINTS = [CHAT, COMPLETIONS, EMBEDDINGS, IMAGES]


@pytest.fixture(scope="module")
def client(served: ServedApp) -> Iterator[httpx.Client]:
    with served.client(headers=served.headers()) as c:
        yield c


def refused(r: httpx.Response, field: str, path: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert field in body["error"], body
    assert body["details"]["status"] == 400 and body["details"]["endpoint"] == path


@pytest.mark.parametrize(("endpoint", "fields"), ACCEPTED, ids=lambda x: str(x)[:30])
def test_accepted_fields_are_ignored(
    client: httpx.Client, endpoint: tuple[str, dict[str, Any]], fields: dict[str, Any]
) -> None:
    path, body = endpoint
    r = client.post(path, json={**body, **fields})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("endpoint", "field", "value"), REFUSED, ids=lambda x: str(x)[:30])
def test_fields_that_would_change_the_output_are_refused_by_name(
    client: httpx.Client, endpoint: tuple[str, dict[str, Any]], field: str, value: Any
) -> None:
    path, body = endpoint
    refused(client.post(path, json={**body, field: value}), field, path)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e[0])
def test_unknown_fields_are_400_by_default_and_types_stay_strict(
    client: httpx.Client, endpoint: tuple[str, dict[str, Any]]
) -> None:
    path, body = endpoint
    r = client.post(path, json={**body, "temprature": 0.5})
    refused(r, "temprature", path)
    assert "Unrecognized request argument" in r.json()["error"]
    refused(client.post(path, json={**body, "user": 5}), "user", path)


@pytest.fixture(scope="module")
def lenient(served: ServedApp) -> Iterator[str]:
    """An app beside the session's with ``unknown_fields: ignore`` (the tiny chat model and the
    embeddings model only)."""
    from ray import serve

    ids = {"tiny-chat", "all-MiniLM-L6-v2"}
    models = [m for m in served.args["models"] if m["id"] in ids]
    ingress = {**served.args["ingress"], "unknown_fields": "ignore"}
    args = {**served.args, "models": models, "ingress": ingress}
    yield run_beside(served, args, "voltage-lenient", "/lenient")
    serve.delete("voltage-lenient")


def test_the_switch_ignores_unknown_fields_only(served: ServedApp, lenient: str) -> None:
    with httpx.Client(base_url=lenient, headers=served.headers(), timeout=60) as c:
        for path, body in (CHAT, COMPLETIONS, EMBEDDINGS):
            seen = "/lenient" + path  # the endpoint as the error names it
            r = c.post(path, json={**body, "temprature": 0.5, "x_gateway_trace": {"id": 1}})
            assert r.status_code == 200, r.text
            refused(c.post(path, json={**body, "user": 5}), "user", seen)  # still strict
            wrong = {"encoding_format": 1} if path == EMBEDDINGS[0] else {"n": "2"}
            refused(c.post(path, json={**body, **wrong}), next(iter(wrong)), seen)
        chat, body = CHAT
        r = c.post(chat, json={**body, "audio": {"voice": "alloy"}})
        refused(r, "audio", "/lenient" + chat)
