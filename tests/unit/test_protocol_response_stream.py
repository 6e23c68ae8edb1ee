"""The Responses API's output: every Response and stream event the builder makes, held against
OpenAI's own schemas, in OpenAI's order; the JSON answer is the stream's last response."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.openai_schema import assert_conforms, assert_event_conforms
from voltage_ray.protocol.chat import TokenLogprob, TopLogprob
from voltage_ray.protocol.response_events import (
    InputTokens,
    Response,
    ResponseDeleted,
    ResponseUsage,
    sse,
)
from voltage_ray.protocol.response_items import ResponseItemList, item_resource
from voltage_ray.protocol.response_stream import (
    Done,
    Failed,
    GenerationDelta,
    ResponseBuilder,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    build_response,
    response_events,
)
from voltage_ray.protocol.responses import CreateResponseRequest

USAGE = ResponseUsage.of(12, 5, cached=4)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
TOOLS = [
    WEATHER,
    {"type": "custom", "name": "run", "format": {"type": "text"}},
    {"type": "namespace", "name": "crm", "description": "CRM.", "tools": [WEATHER]},
    {"type": "web_search"},
]


def logprob(token: str) -> TokenLogprob:
    alternative = TopLogprob(token=token.upper(), logprob=-2.5, bytes=list(token.upper().encode()))
    return TokenLogprob(token=token, logprob=-0.1, bytes=None, top_logprobs=[alternative])


def request(**body: Any) -> CreateResponseRequest:
    return CreateResponseRequest.model_validate(
        {"model": "gpt-4", "input": "hi", "tools": TOOLS, **body}
    )


SCENARIOS: dict[str, tuple[dict[str, Any], list[GenerationDelta]]] = {
    "text": ({}, [TextDelta("Hello"), TextDelta(", world."), Done("stop", USAGE)]),
    "text with logprobs": (
        {"include": ["message.output_text.logprobs"], "top_logprobs": 1},
        [TextDelta("Hel", [logprob("Hel")]), TextDelta("lo", [logprob("lo")]), Done("stop", USAGE)],
    ),
    "a function call": (
        {"tool_choice": "required"},
        [
            ToolCallStart("get_weather"),
            ToolCallDelta('{"city":'),
            ToolCallDelta(' "Paris"}'),
            Done("tool_calls", USAGE),
        ],
    ),
    "two parallel calls after text": (
        {},
        [
            TextDelta("Checking."),
            ToolCallStart("get_weather", call_id="call_a"),
            ToolCallDelta('{"city": "Paris"}'),
            ToolCallStart("crm.get_weather", call_id="call_b"),
            ToolCallDelta('{"city": "Rome"}'),
            Done("tool_calls", USAGE),
        ],
    ),
    "a custom tool call": (
        {"tool_choice": {"type": "custom", "name": "run"}},
        [
            ToolCallStart("run"),
            ToolCallDelta("ls "),
            ToolCallDelta("-la"),
            Done("tool_calls", USAGE),
        ],
    ),
    "cut at max_output_tokens": (
        {"max_output_tokens": 16},
        [TextDelta("A long"), TextDelta(" story"), Done("length", USAGE)],
    ),
    "a call cut short": (
        {},
        [ToolCallStart("get_weather"), ToolCallDelta('{"ci'), Done("length", USAGE)],
    ),
    "nothing said": ({}, [Done("stop", ResponseUsage.of(3, 0))]),
    "failed": ({}, [TextDelta("Hel"), Failed("The model's replica went away.")]),
}


def run(name: str) -> tuple[list[dict[str, Any]], Response]:
    """The scenario's events as the wire has them (JSON), and the builder's response."""
    body, deltas = SCENARIOS[name]
    builder = ResponseBuilder(request(**body))
    events = [json.loads(e.model_dump_json()) for e in response_events(builder, deltas)]
    assert builder.finished
    return events, builder.response


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_event_and_the_response_conform(name: str) -> None:
    events, response = run(name)
    for event in events:
        assert_event_conforms(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final == json.loads(response.model_dump_json())
    assert_conforms("Response", final)
    for index, item in enumerate(final["output"]):
        done = [e for e in events if e["type"] == "response.output_item.done"][index]
        assert (done["output_index"], done["item"]) == (index, item)


def test_text_events_come_in_openais_order() -> None:
    events, response = run("text")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    added = events[2]["item"]
    assert (added["status"], added["content"], added["id"].startswith("msg_")) == (
        "in_progress",
        [],
        True,
    )
    assert events[6]["text"] == "Hello, world." and events[6]["logprobs"] == []
    message = response.model_dump(mode="json")["output"][0]
    assert message["content"] == [
        {"type": "output_text", "text": "Hello, world.", "annotations": [], "logprobs": []}
    ]
    assert (response.status, response.completed_at is not None, response.usage) == (
        "completed",
        True,
        USAGE,
    )
    assert response.id.startswith("resp_") and len(response.id) == len("resp_") + 48


def test_logprobs_reach_the_deltas_and_the_part() -> None:
    events, response = run("text with logprobs")
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [
        {"token": "Hel", "logprob": -0.1, "top_logprobs": [{"token": "HEL", "logprob": -2.5}]}
    ]
    part = response.model_dump(mode="json")["output"][0]["content"][0]
    assert [lp["token"] for lp in part["logprobs"]] == ["Hel", "lo"]
    assert part["logprobs"][0]["bytes"] == list(b"Hel")


def test_calls_split_namespaces_back_and_keep_their_ids() -> None:
    events, response = run("two parallel calls after text")
    output = response.model_dump(mode="json")["output"]
    assert [i["type"] for i in output] == ["message", "function_call", "function_call"]
    first, second = output[1:]
    assert "namespace" not in first and (first["call_id"], first["name"]) == (
        "call_a",
        "get_weather",
    )
    assert (second["namespace"], second["name"], second["arguments"]) == (
        "crm",
        "get_weather",
        '{"city": "Rome"}',
    )
    assert first["id"].startswith("fc_") and first["status"] == "completed"
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(d["output_index"], d["name"]) for d in done] == [
        (1, "get_weather"),
        (2, "get_weather"),
    ]


def test_a_custom_tool_call_streams_its_input() -> None:
    events, response = run("a custom tool call")
    kinds = [e["type"] for e in events]
    assert kinds.count("response.custom_tool_call_input.delta") == 2
    item = response.model_dump(mode="json")["output"][0]
    assert (item["type"], item["input"], item["id"][:4]) == ("custom_tool_call", "ls -la", "ctc_")
    assert item["call_id"].startswith("call_") and len(item["call_id"]) == len("call_") + 24


def test_a_cut_answer_is_incomplete() -> None:
    events, response = run("cut at max_output_tokens")
    assert events[-1]["type"] == "response.incomplete"
    assert (response.status, response.completed_at) == ("incomplete", None)
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.max_output_tokens == 16
    _, cut_call = run("a call cut short")
    assert cut_call.output[0].status == "incomplete"


def test_nothing_said_is_still_a_message() -> None:
    _, response = run("nothing said")
    assert [i.type for i in response.output] == ["message"]


def test_a_failure_fails_the_response() -> None:
    events, response = run("failed")
    assert events[-1]["type"] == "response.failed"
    assert response.error is not None and response.error.model_dump() == {
        "code": "server_error",
        "message": "The model's replica went away.",
    }
    assert response.output[0].status == "incomplete" and response.usage is None
    assert "usage" not in events[-1]["response"]


def test_the_json_answer_is_the_streams_last_response() -> None:
    body, deltas = SCENARIOS["two parallel calls after text"]
    r = request(**body)
    built = build_response(r, deltas, response_id="resp_x", created_at=1, model="served")
    builder = ResponseBuilder(r, response_id="resp_x", created_at=1, model="served")
    last = list(response_events(builder, deltas))[-1]
    strip = {"id", "call_id"}
    items = [
        [{k: v for k, v in i.items() if k not in strip} for i in x.model_dump()["output"]]
        for x in (built, builder.response)
    ]
    assert items[0] == items[1]
    assert (built.id, built.created_at, built.model) == ("resp_x", 1, "served")
    assert json.loads(sse(last).split("data: ", 1)[1]) == json.loads(last.model_dump_json())


def test_the_request_is_echoed_as_openai_echoes_it() -> None:
    r = request(
        instructions="Be brief.",
        temperature=0.5,
        metadata={"team": "a"},
        user="u1",
        text={"format": {"type": "json_object"}},
        reasoning={"summary": "auto"},
        tool_choice="auto",
    )
    echoed = Response.of(r).model_dump(mode="json")
    assert_conforms("Response", echoed)
    assert (echoed["instructions"], echoed["temperature"], echoed["user"]) == (
        "Be brief.",
        0.5,
        "u1",
    )
    assert echoed["text"] == {"format": {"type": "json_object"}, "verbosity": "medium"}
    assert echoed["reasoning"] == {"effort": None, "summary": "auto"}
    assert [t["type"] for t in echoed["tools"]] == [
        "function",
        "custom",
        "namespace",
    ]  # no web_search
    assert echoed["tools"][0]["strict"] is True and echoed["metadata"] == {"team": "a"}
    assert "user" not in Response.of(request()).model_dump(mode="json")
    fmt = {"type": "json_schema", "name": "capital", "schema": {"type": "object"}, "strict": True}
    echoed = Response.of(request(text={"format": fmt}, tool_choice="none")).model_dump(mode="json")
    assert_conforms("Response", echoed)
    assert echoed["text"]["format"] == fmt and echoed["tool_choice"] == "none"


def test_sse_frames_carry_the_event_type() -> None:
    builder = ResponseBuilder(request())
    created = builder.start()[0]
    frame = sse(created)
    assert frame.startswith("event: response.created\ndata: {") and frame.endswith("}\n\n")
    assert json.loads(frame.split("data: ", 1)[1])["sequence_number"] == 0


def test_a_background_response_is_queued_first() -> None:
    builder = ResponseBuilder(request(background=True))
    events = [json.loads(e.model_dump_json()) for e in [*builder.queue(), *builder.start()]]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert [e["response"]["status"] for e in events] == ["queued", "queued", "in_progress"]
    for event in events:
        assert_event_conforms(event)


def test_the_builder_refuses_misuse() -> None:
    builder = ResponseBuilder(request())
    builder.start()
    with pytest.raises(ValueError, match="needs a ToolCallStart"):
        builder.feed(ToolCallDelta("{}"))
    builder.feed(Done("stop", USAGE))
    with pytest.raises(ValueError, match="finished"):
        builder.feed(TextDelta("more"))
    error = json.loads(builder.error("The stream broke.").model_dump_json())
    assert_event_conforms(error)


def test_stored_input_items_are_listed_as_openai_lists_them() -> None:
    r = request(
        input=[
            {"role": "user", "content": "Find Ada."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "custom_tool_call", "call_id": "c2", "name": "run", "input": "ls"},
            {
                "type": "custom_tool_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "a.txt"}],
            },
            {"type": "reasoning", "summary": []},
            {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        ]
    )
    stored = [item_resource(i) for i in r.items]
    assert [i["id"].split("_")[0] for i in stored] == [
        "msg",
        "msg",
        "fc",
        "fco",
        "ctc",
        "ctco",
        "rs",
        "msg",
    ]
    page = ResponseItemList.page(stored, limit=3).model_dump(mode="json")
    assert_conforms("ResponseItemList", page)
    assert (page["has_more"], page["first_id"]) == (True, stored[-1]["id"])
    whole = ResponseItemList.page(stored, order="asc", limit=100).model_dump(mode="json")
    assert_conforms("ResponseItemList", whole)
    assert [i["id"] for i in whole["data"]] == [i["id"] for i in stored] and not whole["has_more"]
    after = ResponseItemList.page(stored, order="asc", after=stored[5]["id"])
    assert [i["id"] for i in after.data] == [stored[6]["id"], stored[7]["id"]]
    with pytest.raises(ValueError, match="none of this response's input items"):
        ResponseItemList.page(stored, after="msg_nope")


def test_the_small_answers() -> None:
    assert ResponseDeleted(id="resp_1").model_dump() == {
        "id": "resp_1",
        "object": "response",
        "deleted": True,
    }
    assert_conforms("TokenCountsResource", InputTokens(input_tokens=12).model_dump())
