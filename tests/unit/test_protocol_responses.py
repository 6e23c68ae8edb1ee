"""The Responses API's requests: real clients' bodies parse, out-of-contract ones are 400s
naming what is wrong, and the views the route reads (tools, tool_choice, format, logprobs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError

from tests.openai_schema import assert_request_conforms
from voltage_ray.protocol.response_items import (
    FunctionCall,
    ItemReference,
    Message,
    chat_messages,
)
from voltage_ray.protocol.response_tools import CUSTOM_INPUT_SCHEMA, custom_input
from voltage_ray.protocol.responses import (
    CreateResponseRequest,
    InputTokensRequest,
    hosted_tools,
    hosted_tools_refusal,
)
from voltage_ray.protocol.tools import NamedToolChoice

FIXTURES = Path(__file__).parent.parent / "fixtures"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[a-z]+/"},
}
CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "Customer records.",
    "tools": [
        {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
        {"type": "custom", "name": "note"},
    ],
}


def parse(**body: Any) -> CreateResponseRequest:
    return CreateResponseRequest.model_validate({"model": "gpt-4", "input": "hi", **body})


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


# --- real clients' bodies -------------------------------------------------------------------


@pytest.mark.parametrize("turn", ["first", "after_call", "after_namespaced_call"])
def test_codex_requests_parse(turn: str) -> None:
    body = fixture("codex_requests.json")[turn]
    assert_request_conforms("CreateResponse", body)
    r = CreateResponseRequest.model_validate(body)
    assert (r.stream, r.store, r.tool_mode, r.parallel_tool_calls) == (True, False, "auto", True)
    assert r.instructions is None and r.client_metadata and r.prompt_cache_key
    assert r.reasoning is not None and r.reasoning.summary == "auto" and not r.logprobs
    assert hosted_tools(r) == ["web_search"]
    names = [t.exposed for t in r.offered_tools]
    assert "exec_command" in names and "multi_agent_v1.close_agent" in names
    tool = r.tool("multi_agent_v1.close_agent")
    assert tool is not None and (tool.namespace, tool.name, tool.strict) == (
        "multi_agent_v1",
        "close_agent",
        False,
    )
    messages = chat_messages(r.items, r.instructions)
    assert [m.role for m in messages[:4]] == ["developer", "developer", "user", "user"]


def test_codex_call_and_output_become_chat_tool_messages() -> None:
    r = CreateResponseRequest.model_validate(fixture("codex_requests.json")["after_call"])
    *_, call, output = chat_messages(r.items)
    assert call.role == "assistant" and call.tool_calls is not None
    assert call.tool_calls[0].function.name == "exec_command"
    assert output.role == "tool" and output.tool_call_id == call.tool_calls[0].id
    assert "hi" in output.text


def test_codex_namespaced_call_is_named_as_the_model_saw_it() -> None:
    r = CreateResponseRequest.model_validate(
        fixture("codex_requests.json")["after_namespaced_call"]
    )
    *_, call, output = chat_messages(r.items)
    assert call.tool_calls is not None
    assert call.tool_calls[0].function.name == "multi_agent_v1.close_agent"
    assert output.tool_call_id == call.tool_calls[0].id


def test_agents_sdk_requests_parse() -> None:
    bodies = fixture("agents_sdk_requests.json")
    for body in (bodies["first"], bodies["after_call"]):
        assert_request_conforms("CreateResponse", body)
    r = CreateResponseRequest.model_validate(bodies["after_call"])
    assert (r.temperature, r.include, r.tool_mode) == (0.2, [], "auto")
    assert r.offered_tools[0].strict and r.offered_tools[0].parameters_schema["required"] == [
        "city"
    ]
    messages = chat_messages(r.items, r.instructions)
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    calls = messages[2].tool_calls or []
    assert calls[0].function.arguments == '{"city": "Paris"}'


def test_a_hand_written_codex_like_request() -> None:
    """What Codex's request holds, and a namespaced custom tool, a grammar, allowed_tools."""
    r = parse(
        stream=True,
        store=False,
        input=[
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Be brief."}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
        ],
        tools=[WEATHER, PATCH, CRM, {"type": "web_search", "external_web_access": False}],
        tool_choice={
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "namespace", "name": "crm"}, {"type": "web_search"}],
        },
        reasoning={"summary": "auto"},
        include=["reasoning.encrypted_content"],
        prompt_cache_key="0199a5c4",
        client_metadata={"x-codex-installation-id": "a1b2"},
    )
    assert [t.exposed for t in r.declared_tools] == [
        "get_weather",
        "apply_patch",
        "crm.lookup",
        "crm.note",
    ]
    assert [t.exposed for t in r.offered_tools] == ["crm.lookup", "crm.note"]
    assert r.tool_mode == "auto" and r.forced_tools == []
    patch = r.tool("apply_patch")
    assert patch is not None and patch.kind == "custom" and patch.format is not None
    note = r.tool("crm.note")
    assert note is not None and note.parameters_schema == CUSTOM_INPUT_SCHEMA
    tools = r.chat_tools() or []
    assert [t.function.name for t in tools] == ["crm.lookup", "crm.note"]
    assert tools[0].model_dump(exclude_none=True)["function"]["strict"] is True
    assert [m.role for m in chat_messages(r.items)] == ["developer", "user"]


# --- the OpenAI SDK's bodies ------------------------------------------------------------------


def test_the_openai_sdk_bodies_parse_and_its_parsers_read_the_answers() -> None:
    """`responses.create`, `.stream` and `.parse(text_format=...)` of the real SDK, against a
    transport that parses each body as the route would and answers with the builder's output
    (JSON or SSE): the SDK reads both."""
    import httpx2  # the openai SDK's HTTP library (3.x)
    import openai
    from pydantic import BaseModel

    from voltage_ray.protocol.response_events import ResponseUsage, sse
    from voltage_ray.protocol.response_stream import (
        Done,
        ResponseBuilder,
        TextDelta,
        response_events,
    )

    class Capital(BaseModel):
        city: str

    bodies: list[dict[str, Any]] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        bodies.append(body)
        r = CreateResponseRequest.model_validate(body)
        text = '{"city":"Paris"}' if r.json_schema else "Paris."
        builder = ResponseBuilder(r)
        events = list(
            response_events(builder, [TextDelta(text), Done("stop", ResponseUsage.of(9, 3))])
        )
        if not r.stream:
            return httpx2.Response(200, json=builder.response.model_dump(mode="json"))
        stream = "".join(sse(e) for e in events)
        return httpx2.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(
        api_key="k",
        base_url="http://test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    done = client.responses.create(
        model="gpt-4", input="Capital of France?", instructions="Be brief.", max_output_tokens=64
    )
    assert done.output_text == "Paris." and done.usage is not None and done.usage.total_tokens == 12
    with client.responses.stream(
        model="gpt-4", input="Capital of France?", tools=cast(Any, [WEATHER])
    ) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "Paris."
    parsed = client.responses.parse(model="gpt-4", input="Capital of France?", text_format=Capital)
    assert parsed.output_parsed == Capital(city="Paris")
    assert bodies[1]["stream"] is True
    assert bodies[2]["text"]["format"]["type"] == "json_schema"
    for body in bodies:
        assert_request_conforms("CreateResponse", body)


# --- out of contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            {
                "input": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "https://x/y.png"}],
                    },
                ]
            },
            "input[2].content[0]: input_image is not supported: the served models read text only",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_file", "file_id": "f"}],
                    }
                ]
            },
            "input[0].output[0]: input_file is not supported",
        ),
        (
            {"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]},
            "input[0]: web_search_call items are not supported",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
            "belong to assistant messages",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input"),
        ({"input": None}, "input is required"),
        ({"modalities": ["text"]}, "Extra inputs are not permitted"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_output_tokens": 15}, "max_output_tokens"),
        ({"max_output_tokens": 64.0}, "max_output_tokens"),
        ({"stream": "true"}, "stream"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"include": ["message.output_text.everything"]}, "include"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"background": True, "store": False}, "background requires store"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options is only allowed"),
        ({"conversation": "conv_1"}, "conversation is not supported"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt is not supported"),
        ({"context_management": [{"type": "compaction"}]}, "context_management is not supported"),
        (
            {"reasoning": {"effort": "high"}},
            "effort is not supported: the served models do not reason",
        ),
        ({"reasoning": {"mode": "pro"}}, "mode is not supported"),
        ({"text": {"verbosity": "low"}}, "verbosity is not supported"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
            "json_schema name",
        ),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "function name 'bad name'"),
        ({"tools": [{"type": "unknown_tool"}]}, "unknown_tool"),
        ({"tools": [WEATHER, {**PATCH, "name": "get_weather"}]}, "get_weather repeat"),
        ({"tools": [{**CRM, "name": "a.b"}]}, "namespace name 'a.b'"),
        ({"tools": [{**CRM, "tools": []}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
            "names the function tool 'get_time'",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "custom", "name": "get_weather"}},
            "names the custom tool 'get_weather'",
        ),
        ({"tools": [CRM], "tool_choice": {"type": "function", "name": "lookup"}}, "(crm.lookup)"),
        (
            {"tools": [{"type": "web_search"}], "tool_choice": "required"},
            "tool_choice 'required' needs",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}},
            "tool_choice web_search_preview is not supported",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "mcp", "server_label": "x"}},
            "tool_choice mcp is not supported",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "auto",
                    "tools": [{"type": "function", "name": "nope"}],
                },
            },
            "'nope'",
        ),
        (
            {
                "tools": [WEATHER, {"type": "web_search"}],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "required",
                    "tools": [{"type": "web_search"}],
                },
            },
            "needs a function or custom tool",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"instructions": "a\ud800b"}, "lone surrogate"),
    ],
)
def test_out_of_contract_bodies_are_rejected_naming_why(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(**body)
    assert says in str(caught.value)


def test_null_means_unset_and_defaults_are_openais() -> None:
    r = parse(temperature=None, top_p=None, tools=None, store=None, truncation=None)
    assert (r.temperature, r.top_p, r.tools, r.store, r.truncation) == (
        1.0,
        1.0,
        None,
        True,
        "disabled",
    )
    assert (r.stream, r.background, r.parallel_tool_calls, r.tool_mode) == (
        False,
        False,
        True,
        "none",
    )


def test_fields_asking_nothing_of_the_output_are_accepted() -> None:
    r = parse(
        include=[
            "reasoning.encrypted_content",
            "web_search_call.action.sources",
            "file_search_call.results",
            "message.input_image.image_url",
        ],
        metadata={"team": "a"},
        user="u",
        safety_identifier="s",
        service_tier="flex",
        prompt_cache_retention="24h",
        prompt_cache_options={"ttl": "30m", "mode": "implicit"},
        moderation={"model": "omni-moderation-latest"},
        max_tool_calls=3,
        reasoning={"effort": "none", "summary": "detailed", "context": "auto"},
        text={"verbosity": "medium"},
        stream=True,
        stream_options={"include_obfuscation": False},
        background=True,
        truncation="auto",
        previous_response_id="resp_1",
    )
    assert not r.logprobs and r.top_logprobs_count is None


# --- the views the route reads ----------------------------------------------------------------


def test_tool_choice_views() -> None:
    r = parse(tools=[WEATHER, CRM], tool_choice={"type": "function", "name": "crm.lookup"})
    assert r.tool_mode == "named" and [t.exposed for t in r.forced_tools] == ["crm.lookup"]
    assert r.chat_tool_choice == NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "crm.lookup"}}
    )
    r = parse(tools=[WEATHER, CRM], tool_choice="required")
    assert r.tool_mode == "required" and len(r.forced_tools) == 3
    r = parse(tools=[WEATHER, CRM], tool_choice="none")
    assert (r.tool_mode, r.forced_tools, r.chat_tool_choice) == ("none", [], "none")
    r = parse(tools=[{"type": "web_search"}])
    assert (r.tool_mode, r.chat_tools(), hosted_tools(r)) == ("none", None, ["web_search"])
    allowed = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "custom", "name": "apply_patch"}],
    }
    r = parse(tools=[WEATHER, PATCH], tool_choice=allowed)
    assert r.tool_mode == "required" and [t.exposed for t in r.forced_tools] == ["apply_patch"]


def test_function_tools_are_strict_unless_they_say_otherwise() -> None:
    unsaid = {"type": "function", "name": "unsaid"}
    r = parse(tools=[unsaid, {**WEATHER, "name": "lax", "strict": False}])
    assert [t.strict for t in r.declared_tools] == [True, False]


def test_text_format_views() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}
    r = parse(text={"format": fmt})
    assert r.json_schema == schema
    assert r.response_format is not None and r.response_format.model_dump(by_alias=True) == {
        "type": "json_schema",
        "json_schema": {"name": "capital", "description": None, "schema": schema, "strict": True},
    }
    r = parse(text={"format": {"type": "json_object"}})
    assert r.json_schema == {"type": "object"} and r.response_format is not None
    assert parse(text={"format": {"type": "text"}}).json_schema is None


def test_logprobs_are_reported_only_when_included() -> None:
    assert parse(top_logprobs=3).top_logprobs_count is None
    assert parse(include=["message.output_text.logprobs"]).top_logprobs_count == 0
    r = parse(include=["message.output_text.logprobs"], top_logprobs=3, max_output_tokens=16)
    assert (r.logprobs, r.top_logprobs_count, r.requested_max_tokens) == (True, 3, 16)


def test_hosted_tools_can_be_refused_by_the_route() -> None:
    r = parse(tools=[WEATHER, {"type": "web_search"}, {"type": "mcp", "server_label": "x"}])
    assert hosted_tools(r) == ["web_search", "mcp"]
    assert hosted_tools_refusal(r) == (
        "tools: web_search, mcp are not supported: this server runs none of OpenAI's hosted tools"
    )
    assert hosted_tools_refusal(parse(tools=[WEATHER])) is None


def test_a_custom_tool_called_as_a_function_is_unwrapped() -> None:
    assert custom_input('{"input": "*** Begin Patch"}') == "*** Begin Patch"
    assert custom_input("raw text") == "raw text"
    assert custom_input('{"other": 1}') == '{"other": 1}'


def test_items_of_earlier_turns_become_chat_messages() -> None:
    r = parse(
        instructions="Be brief.",
        tools=[CRM],
        input=[
            {"role": "user", "content": "Find Ada."},
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Looking.", "annotations": []}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "lookup",
                "namespace": "crm",
                "arguments": "{}",
            },
            {
                "type": "custom_tool_call",
                "call_id": "c2",
                "name": "note",
                "namespace": "crm",
                "input": "ada",
            },
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "found"}],
            },
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "noted"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
    )
    system, user, assistant, out1, out2 = chat_messages(r.items, r.instructions)
    assert (system.text, user.text, assistant.text) == ("Be brief.", "Find Ada.", "Looking.")
    calls = [(c.function.name, c.function.arguments) for c in assistant.tool_calls or []]
    assert calls == [("crm.lookup", "{}"), ("crm.note", '{"input": "ada"}')]
    assert (out1.tool_call_id, out1.text, out2.text) == ("c1", "found", "noted")


def test_item_references_are_kept_for_the_route_to_resolve() -> None:
    r = parse(input=[{"type": "item_reference", "id": "msg_1"}, {"id": "fc_2"}])
    assert r.items == [ItemReference(id="msg_1"), ItemReference(id="fc_2")]
    with pytest.raises(ValueError, match="msg_1 was not resolved"):
        chat_messages(r.items)
    assert isinstance(parse(input=[{"role": "user", "content": "x"}]).items[0], Message)
    assert isinstance(
        parse(
            input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
        ).items[0],
        FunctionCall,
    )


def test_input_tokens_requests() -> None:
    body = {"model": "gpt-4", "input": "hi", "tools": [WEATHER], "instructions": "x"}
    assert_request_conforms("TokenCountsBody", body)
    r = InputTokensRequest.model_validate(body)
    assert [t.exposed for t in r.offered_tools] == ["get_weather"]
    with pytest.raises(ValidationError, match="personality is not supported"):
        InputTokensRequest.model_validate({**body, "personality": "friendly"})
    with pytest.raises(ValidationError, match="stream"):
        InputTokensRequest.model_validate({**body, "stream": True})
