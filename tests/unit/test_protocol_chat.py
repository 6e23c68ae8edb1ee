from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from voltage_ray.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    Delta,
)

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_follow_the_spec() -> None:
    r = ChatCompletionRequest(model="gpt-4", messages=MSG)
    assert (r.temperature, r.top_p, r.n, r.stream) == (1.0, 1.0, 1, False)
    assert (r.presence_penalty, r.frequency_penalty, r.max_tokens) == (0.0, 0.0, None)


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": 2.1},
        {"temperature": -0.1},
        {"top_p": 1.5},
        {"n": 0},
        {"n": 11},
        {"max_tokens": 0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ""},
        {"stream_options": {"include_usage": True}},
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
        {"messages": [{"role": "function", "content": "x", "name": "f"}]},
        {"messages": [{"role": "assistant"}]},  # neither content nor tool_calls
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"logprobs": True, "top_logprobs": 21},
        {"top_logprobs": 2},  # without logprobs
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"five": 1}},
        {"logit_bias": {"-5": 1}},
        {"tools": []},
        {"tools": [{"type": "custom", "custom": {"name": "f"}}]},
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
        {"tools": [{"type": "function", "function": {"name": "f"}}] * 2},
        {"tool_choice": "required"},
        {"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {
            "tool_choice": {"type": "function", "function": {"name": "g"}},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        {"response_format": {"type": "xml"}},
        {"structured_outputs": {}},
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "a\ud800b"}]},
        {"stop": ["ok", "\udfff"]},
    ],
)
def test_out_of_contract_values_are_rejected(field: dict[str, object]) -> None:
    body: dict[str, object] = {"model": "gpt-4", "messages": MSG}
    body.update(field)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_openai_extensions_are_accepted() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "gpt-4",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 3,
            "max_completion_tokens": 5,
            "user": "u",
            "stop": "END",
        }
    )
    assert r.include_usage and r.requested_max_tokens == 5 and r.stop_list == ["END"]
    assert r.messages[0].text == "a"


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_roles_and_token_options_are_accepted() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "gpt-4",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
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
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
            "logprobs": True,
            "top_logprobs": 20,
            "logit_bias": {"42": -100, "7": 2.5},
        }
    )
    assert r.tool_mode == "named" and [t.function.name for t in r.forced_tools] == ["get_weather"]
    assert r.top_logprobs_count == 20 and r.logit_bias == {"42": -100.0, "7": 2.5}
    assert [m.role for m in r.messages] == ["developer", "user", "assistant", "tool"]
    assert r.messages[2].text == "" and r.messages[3].text == "18C"


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ({}, "none"),
        ({"tools": [TOOL]}, "auto"),
        ({"tools": [TOOL], "tool_choice": "none"}, "none"),
        ({"tools": [TOOL], "tool_choice": "auto"}, "auto"),
        ({"tools": [TOOL], "tool_choice": "required"}, "required"),
        ({"tool_choice": "auto"}, "none"),
    ],
)
def test_tool_mode(extra: dict[str, Any], mode: str) -> None:
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **extra})
    assert r.tool_mode == mode


def parse(fragment: str, stream: bool = False) -> dict[str, Any]:
    """A request body exactly as FastAPI hands it to pydantic: JSON parsed by ``json.loads``."""
    body: dict[str, Any] = {"model": "gpt-4", "messages": MSG}
    if stream:
        body["stream"] = True
    body.update(json.loads("{" + fragment + "}"))
    return body


# One case per field per wrong JSON type; the expected error location names the field.
WRONG_TYPES: list[tuple[str, tuple[Any, ...]]] = [
    ('"model": 5', ("model",)),
    ('"model": true', ("model",)),
    ('"model": null', ("model",)),
    ('"messages": "hi"', ("messages",)),
    ('"messages": {"role": "user", "content": "hi"}', ("messages",)),
    ('"messages": null', ("messages",)),
    ('"messages": [{"role": "user", "content": 5}]', ("messages", 0, "content")),
    ('"messages": [{"role": "user", "content": true}]', ("messages", 0, "content")),
    ('"messages": [{"role": "user", "content": null}]', ("messages", 0)),  # needs content
    ('"messages": [{"role": "user", "content": ["hi"]}]', ("messages", 0, "content")),
    (
        '"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]',
        ("messages", 0, "content"),
    ),
    (
        '"messages": [{"role": "user", "content": [{"type": 1, "text": "a"}]}]',
        ("messages", 0, "content"),
    ),
    ('"messages": [{"role": 1, "content": "hi"}]', ("messages", 0, "role")),
    ('"messages": [{"role": null, "content": "hi"}]', ("messages", 0, "role")),
    ('"messages": [{"role": "user", "content": "hi", "name": 3}]', ("messages", 0, "name")),
    ('"messages": [{"role": "user", "content": "hi", "name": true}]', ("messages", 0, "name")),
    ('"temperature": true', ("temperature",)),
    ('"temperature": "1"', ("temperature",)),
    ('"top_p": false', ("top_p",)),
    ('"top_p": "0.5"', ("top_p",)),
    ('"n": 1.0', ("n",)),
    ('"n": true', ("n",)),
    ('"n": "2"', ("n",)),
    ('"stream": "true"', ("stream",)),
    ('"stream": 1', ("stream",)),
    ('"max_tokens": "4"', ("max_tokens",)),
    ('"max_tokens": 4.0', ("max_tokens",)),
    ('"max_tokens": true', ("max_tokens",)),
    ('"presence_penalty": false', ("presence_penalty",)),
    ('"presence_penalty": "0"', ("presence_penalty",)),
    ('"frequency_penalty": false', ("frequency_penalty",)),
    ('"frequency_penalty": "0"', ("frequency_penalty",)),
    ('"stop": 5', ("stop",)),
    ('"stop": true', ("stop",)),
    ('"stop": [1]', ("stop",)),
    ('"stop": ["a", null]', ("stop",)),
    ('"stream_options": "yes"', ("stream_options",)),
    ('"stream_options": {"include_usage": "yes"}', ("stream_options", "include_usage")),
    ('"stream_options": {"include_usage": 1}', ("stream_options", "include_usage")),
    ('"seed": "1"', ("seed",)),
    ('"seed": 1.5', ("seed",)),
    ('"seed": true', ("seed",)),
    ('"max_completion_tokens": 2.0', ("max_completion_tokens",)),
    ('"max_completion_tokens": "2"', ("max_completion_tokens",)),
    ('"max_completion_tokens": true', ("max_completion_tokens",)),
    ('"user": 5', ("user",)),
    ('"user": true', ("user",)),
    ('"response_format": "json_object"', ("response_format",)),
    ('"response_format": {"type": 1}', ("response_format",)),
    ('"tools": {"type": "function"}', ("tools",)),
    ('"tools": [{"type": "function", "function": {"name": 5}}]', ("tools", 0, "function", "name")),
    (
        '"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]',
        ("tools", 0, "function", "parameters"),
    ),
    (
        '"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]',
        ("tools", 0, "function", "strict"),
    ),
    ('"tool_choice": 1', ("tool_choice",)),
    ('"tool_choice": true', ("tool_choice",)),
    ('"parallel_tool_calls": "false"', ("parallel_tool_calls",)),
    ('"parallel_tool_calls": 0', ("parallel_tool_calls",)),
    ('"logprobs": 1', ("logprobs",)),
    ('"logprobs": "true"', ("logprobs",)),
    ('"top_logprobs": 2.0', ("top_logprobs",)),
    ('"top_logprobs": "2"', ("top_logprobs",)),
    ('"logit_bias": [1]', ("logit_bias",)),
    ('"logit_bias": {"5": "1"}', ("logit_bias",)),
    ('"logit_bias": {"5": true}', ("logit_bias",)),
    ('"structured_outputs": "x"', ("structured_outputs",)),
    ('"structured_outputs": {"regex": 5}', ("structured_outputs", "regex")),
    ('"structured_outputs": {"choice": "a"}', ("structured_outputs", "choice")),
    # OpenAI's accepted-and-ignored fields keep their types
    ('"store": "yes"', ("store",)),
    ('"metadata": {"a": 1}', ("metadata", "a")),
    ('"service_tier": 5', ("service_tier",)),
    ('"prompt_cache_key": 5', ("prompt_cache_key",)),
    ('"prompt_cache_options": "x"', ("prompt_cache_options",)),
    ('"prompt_cache_retention": 5', ("prompt_cache_retention",)),
    ('"safety_identifier": 5', ("safety_identifier",)),
    ('"moderation": "x"', ("moderation",)),
    # and the refused ones are refused, whatever their value
    ('"modalities": "text"', ("modalities",)),
    ('"audio": {"voice": "alloy", "format": "wav"}', ("audio",)),
    ('"prediction": {"type": "content", "content": "x"}', ("prediction",)),
    ('"web_search_options": {}', ("web_search_options",)),
    ('"reasoning_effort": "high"', ("reasoning_effort",)),
    ('"verbosity": "low"', ("verbosity",)),
    ('"functions": [{"name": "f"}]', ("functions",)),
    ('"function_call": "auto"', ("function_call",)),
]


@pytest.mark.parametrize(("fragment", "loc"), WRONG_TYPES)
def test_wrong_json_types_are_rejected(fragment: str, loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(parse(fragment, stream="stream_options" in fragment))
    assert any(tuple(e["loc"][: len(loc)]) == loc for e in info.value.errors()), info.value


def test_every_field_has_wrong_type_cases() -> None:
    covered = {json.loads("{" + fragment + "}").popitem()[0] for fragment, _ in WRONG_TYPES}
    assert covered == set(ChatCompletionRequest.model_fields)


def test_an_integer_is_a_valid_number() -> None:
    r = ChatCompletionRequest.model_validate(
        parse('"temperature": 1, "top_p": 0, "presence_penalty": -2, "frequency_penalty": 2')
    )
    assert (r.temperature, r.top_p, r.presence_penalty, r.frequency_penalty) == (1, 0, -2, 2)
    assert all(isinstance(v, float) for v in (r.temperature, r.top_p, r.presence_penalty))


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("temperature", 1.0),
        ("top_p", 1.0),
        ("n", 1),
        ("stream", False),
        ("max_tokens", None),
        ("presence_penalty", 0.0),
        ("frequency_penalty", 0.0),
        ("stop", None),
        ("stream_options", None),
        ("seed", None),
        ("max_completion_tokens", None),
        ("user", None),
        ("response_format", None),
        ("tools", None),
        ("tool_choice", None),
        ("parallel_tool_calls", True),
        ("logprobs", False),
        ("top_logprobs", None),
        ("logit_bias", None),
        ("structured_outputs", None),
    ],
)
def test_null_means_the_default(field: str, default: object) -> None:
    r = ChatCompletionRequest.model_validate(parse(f'"{field}": null'))
    assert getattr(r, field) == default


def test_null_in_nested_models_means_the_default() -> None:
    r = ChatCompletionRequest.model_validate(
        parse(
            '"messages": [{"role": "user", "content": "hi", "name": null}],'
            '"stream_options": {"include_usage": null}',
            stream=True,
        )
    )
    assert r.messages[0].name is None and r.include_usage is False


def test_python_callers_still_work() -> None:
    r = ChatCompletionRequest(model="m", messages=MSG, temperature=0, max_tokens=3)  # type: ignore[arg-type]
    assert r.temperature == 0.0 and isinstance(r.messages[0], ChatMessage)
    assert ChatCompletionRequest.model_validate(r) is r  # an instance passes as it is
    again = ChatCompletionRequest.model_validate(r.model_dump())
    assert again == r
    assert ChatCompletionRequest.model_validate_json(r.model_dump_json()) == r


def chunk(delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
    choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)  # type: ignore[arg-type]
    return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[choice])


def test_stream_deltas_send_role_only_first_and_an_empty_finish_delta() -> None:
    first, middle, last = (
        json.loads(c.model_copy(update={"usage": None}).model_dump_json())
        for c in (
            chunk(Delta(role="assistant", content="")),
            chunk(Delta(content="Hello")),
            chunk(Delta(), finish_reason="stop"),
        )
    )
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0]["delta"] == {"content": "Hello"}
    assert last["choices"][0]["delta"] == {}
    for body in (first, middle):
        assert body["choices"][0]["finish_reason"] is None  # sent, as null
    assert last["choices"][0]["finish_reason"] == "stop"
    for body in (first, middle, last):
        assert body["choices"][0]["logprobs"] is None and "logprobs" in body["choices"][0]
        assert "usage" in body and body["usage"] is None  # include_usage: null until the end


def test_a_delta_still_reads_back() -> None:
    c = chunk(Delta(content="x"))
    assert ChatCompletionChunk.model_validate_json(c.model_dump_json()) == c
    assert c.model_dump()["choices"][0]["delta"] == {"content": "x"}
