"""A Responses request as chat's request, and chat's chunks back as the response's items."""

from __future__ import annotations

from typing import Any

from voltage_ray.protocol.chat import ChatCompletionChunk
from voltage_ray.protocol.response_chat import ChunkReader, chat_request, parse_items
from voltage_ray.protocol.response_stream import (
    Done,
    ResponseBuilder,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)
from voltage_ray.protocol.responses import CreateResponseRequest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin" /.+/'},
}
NAMESPACE = {
    "type": "namespace",
    "name": "files",
    "description": "file tools",
    "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}],
}


def request(**fields: Any) -> CreateResponseRequest:
    return CreateResponseRequest.model_validate({"model": "m", **fields})


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> Any:
    choice = {"index": 0, "delta": {"content": content, **delta}, "finish_reason": finish}
    return ChatCompletionChunk.model_validate(
        {"id": "c", "created": 0, "model": "m", "choices": [choice]}
    )


def usage(prompt: int = 7, completion: int = 3, cached: int = 2) -> Any:
    return ChatCompletionChunk.model_validate(
        {
            "id": "c",
            "created": 0,
            "model": "m",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
    )


def test_text_input_with_instructions_is_a_streamed_chat_with_usage() -> None:
    body = request(input="Hi", instructions="Be brief.", max_output_tokens=20, temperature=0)
    chat = chat_request(body, body.items, "smol")
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert chat.stream and chat.include_usage
    assert chat.requested_max_tokens == 20 and chat.temperature == 0
    assert chat.tools is None and chat.tool_mode == "none"


def test_tools_namespaces_and_a_named_function_become_chats() -> None:
    body = request(
        input="weather?",
        tools=[WEATHER, NAMESPACE, {"type": "web_search"}],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    chat = chat_request(body, body.items, "smol")
    assert [t.function.name for t in chat.tools or []] == ["get_weather", "files.read"]
    assert chat.tool_mode == "named"
    assert chat.forced_tools[0].function.name == "get_weather"


def test_a_forced_custom_tool_is_its_grammar_and_its_text_the_call() -> None:
    body = request(
        input="patch it", tools=[PATCH], tool_choice={"type": "custom", "name": "apply_patch"}
    )
    chat = chat_request(body, body.items, "smol")
    assert chat.tools is None
    assert chat.structured_outputs is not None
    assert chat.structured_outputs.grammar == 'start: "*** Begin" /.+/'
    reader = ChunkReader(body, body.forced_tools[0])
    deltas = (
        reader.feed(chunk("*** Begin")) + reader.feed(chunk(" x", "stop")) + reader.feed(usage())
    )
    assert deltas[0] == ToolCallStart("apply_patch", kind="custom")
    assert [d.text for d in deltas if isinstance(d, ToolCallDelta)] == ["*** Begin", " x"]
    assert isinstance(deltas[-1], Done) and deltas[-1].finish_reason == "tool_calls"
    builder = ResponseBuilder(body)
    builder.start()
    for d in deltas:
        builder.feed(d)
    (item,) = builder.response.output
    assert item.type == "custom_tool_call" and item.input == "*** Begin x"


def test_text_then_usage_is_text_deltas_then_done_with_cached_tokens() -> None:
    body = request(input="Hi")
    reader = ChunkReader(body)
    deltas = reader.feed(chunk("Hel")) + reader.feed(chunk("lo", "length")) + reader.feed(usage())
    assert [d.text for d in deltas if isinstance(d, TextDelta)] == ["Hel", "lo"]
    done = deltas[-1]
    assert isinstance(done, Done) and done.finish_reason == "length"
    assert done.usage.input_tokens == 7 and done.usage.output_tokens == 3
    assert done.usage.input_tokens_details.cached_tokens == 2


def test_a_custom_call_written_as_json_comes_back_as_its_text() -> None:
    body = request(input="patch", tools=[PATCH, WEATHER], tool_choice="auto")
    reader = ChunkReader(body)
    start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "apply_patch"}}
    args = {"index": 0, "function": {"arguments": '{"input": "*** Begin y"}'}}
    weather = {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_weather"}}
    deltas = (
        reader.feed(chunk(tool_calls=[start]))
        + reader.feed(chunk(tool_calls=[args]))
        + reader.feed(chunk(tool_calls=[weather]))
        + reader.feed(chunk(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}]))
        + reader.feed(chunk(finish="tool_calls"))
        + reader.feed(usage())
    )
    assert deltas[:4] == [
        ToolCallStart("apply_patch", "call_1", kind="custom"),
        ToolCallDelta("*** Begin y"),
        ToolCallStart("get_weather", "call_2"),
        ToolCallDelta("{}"),
    ]
    assert isinstance(deltas[-1], Done) and deltas[-1].finish_reason == "tool_calls"


def test_stored_output_items_read_back_as_input() -> None:
    stored = [
        {
            "id": "msg_1",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_text", "text": "Hi"}],
        },
        {
            "id": "msg_2",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
            ],
        },
        {
            "id": "fc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "read",
            "namespace": "files",
            "arguments": "{}",
        },
        {
            "id": "fco_1",
            "type": "function_call_output",
            "status": "completed",
            "call_id": "call_1",
            "output": "text",
        },
    ]
    body = request(input="next")
    chat = chat_request(body, [*parse_items(stored), *body.items], "smol")
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "user"]
    assert chat.messages[1].tool_calls is not None
    assert chat.messages[1].tool_calls[0].function.name == "files.read"
