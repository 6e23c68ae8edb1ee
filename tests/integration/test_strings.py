"""No request string breaks the service: every string in every endpoint's request bodies (values
and object keys) is replaced, one at a time, by a lone surrogate, a NUL and a megabyte of text;
each answer is a 200 (where the string is fine) or a 4xx in the spec's error shape, never a 500.

The bodies are realistic and rich (tools, structured outputs, stops, metadata, logit_bias...),
and a check holds them against the app's own OpenAPI document: every string property a request
schema declares appears in some body here, so a field added later is fuzzed too, or this fails.
"""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.integration.conftest import ServedApp

SURROGATE = "\ud800"
BAD = {"surrogate": f"a{SURROGATE}b", "nul": "a\x00b", "megabyte": "x" * (1 << 20)}
MESSAGES = [{"role": "user", "content": "Say hi", "name": "alice"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "a city"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
CHAT: list[dict[str, Any]] = [
    {
        "model": "tiny-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "max_tokens": 1,
        "stop": ["END", "\n\n"],
        "user": "u-1",
        "metadata": {"team": "a"},
        "logit_bias": {"5": 1.0},
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "safety_identifier": "s-1",
        "prompt_cache_key": "k-1",
        "prompt_cache_retention": "24h",
        "service_tier": "auto",
        "modalities": ["text"],
    },
    {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
        "max_tokens": 1,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "description": "an answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        },
    },
    {
        "model": "tiny-chat",
        "messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
        "max_tokens": 1,
        "structured_outputs": {"regex": "[a-z]+"},
    },
    {
        "model": "tiny-chat",
        "messages": MESSAGES,
        "max_tokens": 1,
        "structured_outputs": {"choice": ["yes", "no"]},
        "stop": "END",
    },
    {
        "model": "tiny-chat",
        "messages": MESSAGES,
        "max_tokens": 1,
        "structured_outputs": {"grammar": 'start: "yes" | "no"'},
    },
]
COMPLETIONS: list[dict[str, Any]] = [
    {"model": "tiny-chat", "prompt": "Say hi", "max_tokens": 1, "stop": "END", "user": "u"},
    {"model": "tiny-chat", "prompt": ["one", "two"], "max_tokens": 1, "stop": ["a", "b"]},
    {"model": "tiny-chat", "prompt": "x", "suffix": "y", "max_tokens": 1},
]
EMBEDDINGS: list[dict[str, Any]] = [
    {"model": "all-MiniLM-L6-v2", "input": "a fox", "user": "u", "encoding_format": "float"},
    {"model": "all-MiniLM-L6-v2", "input": ["a fox", "a dog"]},
]
IMAGES: list[dict[str, Any]] = [
    {
        "model": "tiny-sd",
        "prompt": "a fox",
        "size": "256x256",
        "num_inference_steps": 10,
        "response_format": "b64_json",
        "user": "u",
        "quality": "standard",
        "style": "vivid",
        "moderation": "auto",
        "background": "auto",
        "output_format": "png",
    }
]
RESPONSE_ITEMS: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {
        "type": "message",
        "id": "msg_1",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": "Say hi"}],
    },
    {
        "type": "message",
        "role": "assistant",
        "phase": "final_answer",
        "content": [
            {"type": "output_text", "text": "Hi", "annotations": []},
            {"type": "refusal", "refusal": "no"},
        ],
    },
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "read",
        "namespace": "files",
        "arguments": '{"path": "a"}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "text"},
    {"type": "custom_tool_call", "call_id": "call_2", "name": "patch", "input": "*** x"},
    {"type": "custom_tool_call_output", "call_id": "call_2", "output": "done"},
]
RESPONSE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": TOOL["function"]["parameters"],
        "strict": True,
        "allowed_callers": ["direct"],
    },
    {
        "type": "namespace",
        "name": "files",
        "description": "file tools",
        "tools": [{"type": "function", "name": "read", "description": "read a file"}],
    },
    {
        "type": "custom",
        "name": "patch",
        "description": "apply a patch",
        "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** " /[a-z]+/'},
    },
    {"type": "web_search"},
]
RESPONSES: list[dict[str, Any]] = [
    {
        "model": "tiny-chat",
        "input": RESPONSE_ITEMS,
        "instructions": "Answer briefly.",
        "tools": RESPONSE_TOOLS,
        "tool_choice": "auto",
        "max_output_tokens": 16,
        "store": False,
        "include": ["message.output_text.logprobs"],
        "metadata": {"team": "a"},
        "user": "u-1",
        "safety_identifier": "s-1",
        "service_tier": "default",
        "prompt_cache_key": "conv-1",
        "prompt_cache_retention": "in_memory",
        "client_metadata": {"session": "abc"},
        "truncation": "auto",
        "reasoning": {"effort": "none", "summary": "auto", "context": "auto", "mode": "standard"},
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
    },
    {
        "model": "tiny-chat",
        "input": "Say hi",
        "max_output_tokens": 16,
        "store": False,
        "text": {
            "format": {
                "type": "json_schema",
                "name": "answer",
                "description": "an answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            }
        },
        "tools": [TOOL["function"] | {"type": "function"}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "reasoning": {"generate_summary": "auto"},
    },
    {
        "model": "tiny-chat",
        "input": "Say hi",
        "previous_response_id": "resp_1",
        "conversation": "conv_1",
        "tools": RESPONSE_TOOLS[2:3],
        "tool_choice": {"type": "custom", "name": "patch"},
    },
]
# input_tokens reads the same input, tools and text models as create (protocol/responses.py's
# ResponseInputs): those are fuzzed through /v1/responses; these cover what is its own.
INPUT_TOKENS: list[dict[str, Any]] = [
    {"model": "tiny-chat", "input": "Say hi", "instructions": "Be brief.", "truncation": "auto"},
    {"model": "tiny-chat", "input": "Say hi", "personality": "friendly"},
]
SHARED = {"/v1/responses/input_tokens": ["/v1/responses"]}
BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/images/generations": IMAGES,
    "/v1/responses": RESPONSES,
    "/v1/responses/input_tokens": INPUT_TOKENS,
}
SCHEMAS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/embeddings": "EmbeddingRequest",
    "/v1/images/generations": "ImageGenerationRequest",
    "/v1/responses": "CreateResponseRequest",
    "/v1/responses/input_tokens": "InputTokensRequest",
}


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string in a JSON value: (path, "value"), and every object key: (path, "key")."""
    if isinstance(value, str):
        yield path, "value"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), "key"
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))


def replaced(body: dict[str, Any], path: tuple[Any, ...], kind: str, bad: str) -> dict[str, Any]:
    out = copy.deepcopy(body)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind == "key":
        parent[bad] = parent.pop(last)
    else:
        parent[last] = bad
    return out


def schema_strings(document: dict[str, Any], name: str) -> set[str]:
    """The names of every string property reachable from a request schema."""
    schemas = document["components"]["schemas"]
    found: set[str] = set()
    seen: set[str] = set()

    def walk(node: Any, prop: str | None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, prop)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = ref.rsplit("/", 1)[-1]
            if target not in seen:
                seen.add(target)
                walk(schemas[target], prop)
            return
        if node.get("type") == "string" and prop is not None:
            found.add(prop)
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, key)
        for key in ("anyOf", "oneOf", "allOf", "items", "prefixItems", "additionalProperties"):
            if key in node:
                walk(node[key], prop)

    walk(schemas[name], None)
    return found


def test_every_string_property_of_every_request_schema_is_fuzzed(served: ServedApp) -> None:
    document = httpx.get(served.base_url + "/openapi.json", timeout=30).json()
    for endpoint, bodies in BODIES.items():
        declared = schema_strings(document, SCHEMAS[endpoint])
        shared = [b for other in SHARED.get(endpoint, ()) for b in BODIES[other]]
        present = {str(p[-1]) for body in [*bodies, *shared] for p, _ in leaves(body)}
        missing = declared - present
        assert not missing, f"{endpoint}: add bodies with {sorted(missing)}"


def cases() -> Iterator[Any]:
    for endpoint, bodies in BODIES.items():
        for b, body in enumerate(bodies):
            for path, kind in leaves(body):
                name = ".".join(map(str, path))
                yield pytest.param(endpoint, b, path, kind, id=f"{endpoint}[{b}]:{kind}:{name}")


@pytest.mark.parametrize(("endpoint", "b", "path", "kind"), list(cases()))
def test_no_string_is_a_500(
    served: ServedApp, endpoint: str, b: int, path: tuple[Any, ...], kind: str
) -> None:
    body = BODIES[endpoint][b]

    def send(bad: str) -> httpx.Response:
        data = json.dumps(replaced(body, path, kind, bad))  # \ud800 as JSON's escape
        with served.client() as c:
            return c.post(endpoint, content=data, headers={**served.headers(), **JSON})

    with ThreadPoolExecutor(len(BAD)) as pool:  # the three at once: the suite's time
        answers = dict(zip(BAD, pool.map(send, BAD.values()), strict=True))
    for what, r in answers.items():
        assert r.status_code < 500, (what, r.status_code, r.text[:300])
        if r.status_code >= 400:
            payload = r.json()
            assert isinstance(payload["error"], str) and payload["error"], payload
            assert payload["details"]["status"] == r.status_code
            assert payload["details"]["endpoint"] == endpoint


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("bad", ["%ED%A0%80", "a%00b", "x" * 10_000])
def test_a_path_with_any_string_is_answered_in_the_spec_shape(served: ServedApp, bad: str) -> None:
    with served.client() as c:
        r = c.get(f"/v1/models/{bad}", headers=served.headers())
    assert r.status_code == 404, r.text[:300]
    assert r.json()["details"]["status"] == 404


def raw_request(base_url: str, data: bytes) -> bytes:
    """Send bytes no HTTP client library would build; the answer's head and some body."""
    u = urlparse(base_url)
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=30) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


OVERSIZED = {
    "a 60,000-character path": b"GET /v1/models/" + b"x" * 60_000 + b" HTTP/1.1\r\n",
    "a 64 KiB header": b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"y" * 65_536 + b"\r\n",
    "500 headers": b"GET /v1/models HTTP/1.1\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(500)),
}


@pytest.mark.parametrize("what", list(OVERSIZED))
def test_oversized_request_heads_reach_the_app_and_get_json(served: ServedApp, what: str) -> None:
    """Through Serve's default proxy (the tests' app) these reach the app: the spec's JSON.
    README's table says what HAProxy answers instead (its 16 KiB buffer, 101 headers)."""
    answer = raw_request(served.base_url, OVERSIZED[what] + b"Host: localhost\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 40"), head[:200]
    assert b"content-type: application/json" in head.lower(), head[:400]
    assert body.startswith(b'{"error":'), body[:200]


def test_a_raw_nul_in_the_path_is_refused_by_the_proxy(served: ServedApp) -> None:
    """A literal NUL is not HTTP: the proxy refuses it before the app (README's table)."""
    answer = raw_request(served.base_url, b"GET /v1/models/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
