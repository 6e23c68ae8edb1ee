"""Structured outputs, tool calls, logprobs and logit_bias end to end: the OpenAI SDK over HTTP
against the session's app, on the random tiny model (the grammar must carry it) and SmolLM2.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.integration.conftest import CACHE_DIR, ServedApp

# Bounded strings and arrays: the random tiny model ends every value within a few tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "Tell me about a person"}]


def sdk(served: ServedApp, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.key, **kw)


def check_person(value: dict[str, Any]) -> None:
    assert list(value) == list(PERSON["properties"])  # every field, in the schema's order
    assert len(value["name"]) <= 8 and 0 <= value["age"] <= 120 and isinstance(value["age"], int)
    assert value["role"] in ("admin", "user", "guest") and isinstance(value["active"], bool)
    assert len(value["tags"]) <= 3 and all(len(t) <= 4 for t in value["tags"])
    assert set(value["address"]) == {"city", "zip"} and len(value["address"]["zip"]) == 5
    assert value["address"]["zip"].isdigit()


def test_json_schema_outputs_validate_even_from_the_random_model(served: ServedApp) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = sdk(served).chat.completions.create(
            model="tiny-chat", messages=USER, response_format=fmt, max_tokens=300, n=2, seed=seed
        )
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            check_person(json.loads(choice.message.content or ""))


def test_cut_short_a_constrained_answer_finishes_with_length(served: ServedApp) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = sdk(served).chat.completions.create(
        model="tiny-chat", messages=USER, response_format=fmt, max_tokens=5, seed=1
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5  # type: ignore[union-attr]
    text = r.choices[0].message.content or ""
    assert text and (text.startswith('{"name": "') or '{"name": "'.startswith(text))


class Capital(BaseModel):
    country: str
    capital: str


def test_parse_with_a_pydantic_model_on_smollm2(served: ServedApp) -> None:
    completion = sdk(served).chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital,
        temperature=0,
        max_tokens=60,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital) and "Paris" in parsed.capital
    assert completion.choices[0].message.refusal is None


def test_json_object_parses(served: ServedApp) -> None:
    r = sdk(served).chat.completions.create(
        model="smol",
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_gives_valid_calls_from_the_random_model(
    served: ServedApp, parallel: bool
) -> None:
    for seed in range(3):
        r = sdk(served).chat.completions.create(
            model="tiny-chat",
            messages=USER,
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=300,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            args = json.loads(call.function.arguments)  # type: ignore[union-attr]
            if call.function.name == "get_weather":  # type: ignore[union-attr]
                assert args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 10
            else:
                assert call.function.name == "get_time" and args["zone"] in ("UTC", "CET")  # type: ignore[union-attr]


def test_a_named_function_is_called_by_the_random_model(served: ServedApp) -> None:
    r = sdk(served).chat.completions.create(
        model="tiny-chat",
        messages=USER,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=100,
        n=2,
        seed=3,
    )
    for choice in r.choices:
        [call] = choice.message.tool_calls or []
        assert call.function.name == "get_time"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")  # type: ignore[union-attr]
        assert choice.finish_reason == "tool_calls"


WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def _round_trip_messages(call_id: str, arguments: str) -> list[dict[str, Any]]:
    """The question, the assistant's get_weather call, and the tool's result."""
    call = {"name": "get_weather", "arguments": arguments}
    return [
        *WEATHER_Q,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]


def test_a_tool_round_trip(served: ServedApp) -> None:
    """Call (forced, so the small model makes it), the tool's result, then the answer."""
    client = sdk(served)
    first = client.chat.completions.create(
        model="smol",
        messages=WEATHER_Q,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    [call] = first.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}  # type: ignore[union-attr]
    answer = client.chat.completions.create(
        model="smol",
        messages=[
            {"role": "developer", "content": "You are a weather assistant."},
            *_round_trip_messages(call.id, call.function.arguments),  # type: ignore[union-attr]
        ],  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_tokens=40,
    )
    text = answer.choices[0].message.content or ""
    assert answer.choices[0].message.tool_calls is None and text.strip()
    assert "21" in text or "sunny" in text.lower()


def test_a_streamed_tool_round_trip(served: ServedApp) -> None:
    client = sdk(served)
    stream = client.chat.completions.create(
        model="smol",
        messages=WEATHER_Q,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
    first, rest = pieces[0], pieces[1:]
    assert first.id and first.id.startswith("call_") and first.type == "function"
    assert first.function and first.function.name == "get_weather"
    assert all(p.id is None and p.function and p.function.name is None for p in rest)
    arguments = "".join((p.function.arguments or "") for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(d.content in (None, "") for d in deltas)

    answer = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smol",
            messages=_round_trip_messages(first.id, arguments),  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="none",
            temperature=0,
            max_tokens=40,
            stream=True,
        )
        if c.choices
    )
    assert "21" in answer or "sunny" in answer.lower()


# The model's own Hermes format, written by the random model because a regex (vLLM's
# structured_outputs extension) leaves it no other text: what tool_choice auto then parses.
HERMES_CALL = (
    r'I will check\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}'
    r"\n</tool_call>"
)


def test_auto_tools_parse_the_calls_the_model_writes(served: ServedApp) -> None:
    r = sdk(served).chat.completions.create(
        model="tiny-chat",
        messages=USER,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        max_tokens=100,
        seed=2,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_time"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")  # type: ignore[union-attr]
    chunks = list(
        sdk(served).chat.completions.create(
            model="tiny-chat",
            messages=USER,
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            max_tokens=100,
            seed=2,
            stream=True,
            extra_body={"structured_outputs": {"regex": HERMES_CALL}},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "I will check.\n"
    pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_time"
    streamed = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert streamed == call.function.arguments  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_choice_and_regex_constraints(served: ServedApp) -> None:
    for seed in range(4):
        r = sdk(served).chat.completions.create(
            model="tiny-chat",
            messages=USER,
            max_tokens=20,
            seed=seed,
            extra_body={"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
        )
        assert r.choices[0].message.content in ("positive", "negative", "neutral")
        assert r.choices[0].finish_reason == "stop"
    r = sdk(served).chat.completions.create(
        model="tiny-chat",
        messages=USER,
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
    )
    text = r.choices[0].message.content or ""
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()


def test_logprobs_shapes_and_values(served: ServedApp) -> None:
    r = sdk(served).chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = r.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 5
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the top-1
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
        assert bytes(t.bytes or []).decode("utf-8", "replace") == t.token
    plain = sdk(served).chat.completions.create(model="tiny-chat", messages=USER, max_tokens=4)
    assert plain.choices[0].logprobs is None
    just = sdk(served).chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=4, logprobs=True
    )
    assert all(t.top_logprobs == [] for t in just.choices[0].logprobs.content or [])  # type: ignore[union-attr]


def test_streamed_logprobs_cover_every_token(served: ServedApp) -> None:
    chunks = list(
        sdk(served).chat.completions.create(
            model="tiny-chat",
            messages=USER,
            max_tokens=10,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    scored = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(scored) == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in scored) == text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in scored)


def test_logit_bias_bans_and_forces_tokens(served: ServedApp) -> None:
    kw: dict[str, Any] = dict(
        model="tiny-chat", messages=USER, max_tokens=6, temperature=0, logprobs=True
    )
    client = sdk(served)
    greedy = client.chat.completions.create(**kw).choices[0].logprobs.content  # type: ignore[union-attr]
    first = _token_id(greedy[0].token)  # type: ignore[index]
    banned = client.chat.completions.create(**kw, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.content[0].token != greedy[0].token  # type: ignore[index,union-attr]
    forced_id = _token_id(" fox")
    forced = client.chat.completions.create(**kw, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == " fox" * 6
    sampled = client.chat.completions.create(
        **{**kw, "temperature": 1.0}, seed=5, logit_bias={str(forced_id): 100}
    )
    assert sampled.choices[0].message.content == " fox" * 6


def _token_id(text: str) -> int:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource

    tok = AutoTokenizer.from_pretrained(materialize(BuiltinSource(builtin="tiny-llama"), CACHE_DIR))
    [token] = tok.encode(text, add_special_tokens=False)
    return int(token)


async def test_constrained_and_free_requests_in_one_batch(served: ServedApp) -> None:
    client = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=served.key)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    free: dict[str, Any] = dict(
        model="tiny-chat", messages=USER, max_tokens=24, temperature=0.9, seed=11
    )
    alone = (await client.chat.completions.create(**free)).choices[0].message.content
    results = await asyncio.gather(
        client.chat.completions.create(**free),
        *[
            client.chat.completions.create(
                model="tiny-chat", messages=USER, response_format=fmt, max_tokens=300, seed=s
            )
            for s in range(3)
        ],
        client.chat.completions.create(**free),
    )
    assert results[0].choices[0].message.content == alone
    assert results[-1].choices[0].message.content == alone
    for r in results[1:-1]:
        check_person(json.loads(r.choices[0].message.content or ""))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema cannot be enforced: Invalid type: nope",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"if": {}}},
                }
            },
            'Unimplemented keys: ["if"]',
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}
                ],
                "tool_choice": "required",
            },
            "tools cannot be enforced",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "function name 'a b'"),
        ({"tools": [{"type": "function", "function": {}}]}, "name"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "'g'",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"top_logprobs": 3}, "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"100000": 5}}, "outside this model's vocabulary"),
        ({"logit_bias": {"3": 101}}, "[-100, 100]"),
    ],
)
def test_bad_schemas_tools_and_token_options_are_400s(
    served: ServedApp, body: dict[str, Any], words: str
) -> None:
    with httpx.Client(base_url=served.base_url, timeout=60) as c:
        r = c.post(
            "/v1/chat/completions",
            headers=served.headers(),
            json={"model": "tiny-chat", "messages": USER, **body},
        )
    assert r.status_code == 400, r.text
    body = r.json()
    details = body["details"]
    assert details["status"] == 400 and details["endpoint"] == "/v1/chat/completions"
    assert words in body["error"], body


def test_the_message_carries_refusal_null_and_roles_are_accepted(served: ServedApp) -> None:
    with httpx.Client(base_url=served.base_url, timeout=60) as c:
        r = c.post(
            "/v1/chat/completions",
            headers=served.headers(),
            json={
                "model": "tiny-chat",
                "max_tokens": 3,
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    *_round_trip_messages("call_abc", '{"city": "Paris"}'),
                ],
            },
        )
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["refusal"] is None and "refusal" in message and "tool_calls" not in message
