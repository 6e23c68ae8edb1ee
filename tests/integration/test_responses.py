"""The Responses API (`/v1/responses`) on the session app: the OpenAI SDK and raw HTTP, the tiny
random model and SmolLM2, every answer and event held against OpenAI's published schemas."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.integration.conftest import ServedApp
from tests.integration.test_limits import usage_row
from tests.openai_schema import assert_conforms, assert_event_conforms
from voltage_ray.limits.keys import parse_key

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def sdk(served: ServedApp, key: str | None = None, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + prefix, api_key=key or served.key)


@pytest.fixture(scope="module")
def client(served: ServedApp) -> Iterator[httpx.Client]:
    with served.client(headers=served.headers()) as c:
        yield c


def create(client: httpx.Client, **body: Any) -> Any:
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert_conforms("Response", answer)
    return answer


def events(client: httpx.Client, path: str = "/v1/responses", **body: Any) -> list[Any]:
    """A stream's events: each `event:` line's type must be its data's."""
    out = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == kind, (kind, event)
                out.append(event)
    return out


def test_the_sdk_creates_responses_on_both_prefixes_with_instructions(served: ServedApp) -> None:
    for prefix in ("/v1", "/api/voltage/v1"):
        r = sdk(served, prefix=prefix).responses.create(
            model="smol",
            instructions="Answer in one word.",
            input="What colour is the sky?",
            max_output_tokens=16,
            temperature=0,
        )
        assert r.id.startswith("resp_") and r.object == "response"
        assert r.status in ("completed", "incomplete") and r.output_text
        assert r.instructions == "Answer in one word."
        assert r.usage is not None and 0 < r.usage.output_tokens <= 16
        assert r.usage.input_tokens > 10  # the instructions and the question
        assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_a_stream_sends_every_event_in_order_each_conforming(client: httpx.Client) -> None:
    got = events(client, model="tiny-chat", input="Hi", max_output_tokens=16)
    for e in got:
        assert_event_conforms(e)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    kinds = [e["type"] for e in got]
    head = ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[:4] == [*head, "response.content_part.added"]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"} and kinds[4:-4]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final = got[-1]["response"]
    text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] > 0
    stored = client.get(f"/v1/responses/{final['id']}").json()
    assert stored["output"] == final["output"] and stored["status"] == final["status"]


class City(BaseModel):
    city: str


def test_parse_with_a_text_format_returns_the_model(served: ServedApp) -> None:
    r = sdk(served).responses.parse(
        model="smol",
        input="Name a city in France.",
        text_format=City,
        max_output_tokens=40,
        temperature=0,
    )
    assert isinstance(r.output_parsed, City) and r.output_parsed.city


def test_a_function_tool_round_trip_stored_and_stateless(served: ServedApp) -> None:
    client = sdk(served)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(
        model="smol",
        input=ask,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}  # strict: no other key
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    # Stored: previous_response_id carries the conversation.
    second = client.responses.create(
        model="smol",
        previous_response_id=first.id,
        input=[answer],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=24,
        temperature=0,
    )
    assert second.output_text and second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the whole conversation
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]  # its own input only
    # Stateless: the client sends the items back itself.
    again = client.responses.create(
        model="smol",
        store=False,
        input=[*ask, call.model_dump(exclude_none=True), answer],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=24,
        temperature=0,
    )
    assert again.output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(again.id)  # not stored


def test_a_custom_tool_with_a_lark_grammar(served: ServedApp) -> None:
    tool = {
        "type": "custom",
        "name": "verdict",
        "description": "Say yes or no",
        "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "yes" | "no"'},
    }
    r = sdk(served).responses.create(
        model="smol",
        input="Is Paris in France?",
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "custom", "name": "verdict"},
    )
    (call,) = r.output
    assert call.type == "custom_tool_call" and call.name == "verdict"
    assert call.input in ("yes", "no") and r.status == "completed"


def test_truncation_auto_drops_the_oldest_items_disabled_is_a_400(client: httpx.Client) -> None:
    # tiny-chat reads characters as tokens, up to 2048: these turns hold about 3,000.
    turns = [{"role": "user", "content": f"turn {i} " + "x" * 290} for i in range(10)]
    r = client.post(
        "/v1/responses", json={"model": "tiny-chat", "input": turns, "max_output_tokens": 16}
    )
    assert r.status_code == 400, r.text
    assert r.json()["details"]["code"] == "context_length_exceeded"
    answer = create(client, model="tiny-chat", input=turns, max_output_tokens=16, truncation="auto")
    assert answer["truncation"] == "auto"
    assert 1000 < answer["usage"]["input_tokens"] <= 2048 - 16
    kept = client.get(f"/v1/responses/{answer['id']}/input_items?limit=100").json()
    assert len(kept["data"]) == 10  # the input as sent is kept whole


def test_background_runs_are_polled_and_cancelled(client: httpx.Client) -> None:
    queued = create(client, model="tiny-chat", input="Hi", background=True, max_output_tokens=16)
    assert queued["status"] == "queued" and queued["background"] is True
    deadline = time.monotonic() + 60
    while (got := client.get(f"/v1/responses/{queued['id']}").json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got["status"] in ("completed", "incomplete") and got["output"]
    r = client.post(f"/v1/responses/{queued['id']}/cancel")
    assert r.status_code == 400 and "cannot be cancelled" in r.json()["error"]
    # A long one, cancelled while it runs: it stays cancelled.
    long = create(client, model="tiny-chat", input="Hi", background=True, max_output_tokens=1800)
    cancelled = client.post(f"/v1/responses/{long['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    time.sleep(2.5)  # past a lease renewal: the run has seen it and stopped
    assert client.get(f"/v1/responses/{long['id']}").json()["status"] == "cancelled"
    foreground = create(client, model="tiny-chat", input="Hi", max_output_tokens=16)
    r = client.post(f"/v1/responses/{foreground['id']}/cancel")
    assert r.status_code == 400, r.text


def test_a_response_is_its_keys_alone_and_delete_removes_it(served: ServedApp) -> None:
    mine = sdk(served).responses.create(model="tiny-chat", input="Hi", max_output_tokens=16)
    other = sdk(served, served.new_key())
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):  # nor continue it
        other.responses.create(
            model="tiny-chat", input="more", previous_response_id=mine.id, max_output_tokens=16
        )
    assert sdk(served).responses.retrieve(mine.id).id == mine.id
    sdk(served).responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        sdk(served).responses.retrieve(mine.id)


def test_input_items_page_as_openai_pages(client: httpx.Client) -> None:
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    answer = create(client, model="tiny-chat", input=turns, max_output_tokens=16)
    path = f"/v1/responses/{answer['id']}/input_items"
    page = client.get(path, params={"limit": 2}).json()
    assert_conforms("ResponseItemList", page)
    assert [i["content"][0]["text"] for i in page["data"]] == ["turn 4", "turn 3"]
    assert page["has_more"] is True
    rest = client.get(path, params={"limit": 10, "after": page["last_id"], "order": "desc"}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["turn 2", "turn 1", "turn 0"]
    assert rest["has_more"] is False


def test_input_tokens_counts_what_create_reads(client: httpx.Client) -> None:
    body = {"model": "tiny-chat", "input": "Hello there", "instructions": "Be brief."}
    r = client.post("/v1/responses/input_tokens", json=body)
    assert r.status_code == 200, r.text
    counted = r.json()
    assert_conforms("TokenCountsResource", counted)
    answer = create(client, **body, max_output_tokens=16)
    assert counted["input_tokens"] == answer["usage"]["input_tokens"]


def test_usage_is_billed_exactly_as_chat(served: ServedApp) -> None:
    key = served.new_key("limits_metered")
    with served.client(headers=served.headers(key)) as c:
        whole = create(c, model="tiny-chat", input="Hi", max_output_tokens=16)
        streamed = events(c, model="tiny-chat", input="Hello", max_output_tokens=16)[-1]
    total = whole["usage"]["total_tokens"] + streamed["response"]["usage"]["total_tokens"]
    key_id = parse_key(key)
    assert key_id is not None
    deadline = time.monotonic() + 10
    while (row := usage_row(served.db, key_id)) is None or row[0] < 2 or row[2] != 0:
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    assert row == (2, total, 0)


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"input": "Hi", "max_output_tokens": 5}, 400, "max_output_tokens"),
        ({"input": "Hi", "background": True, "store": False}, 400, "store"),
        ({"input": "Hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({"input": "Hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"input": "Hi", "tool_choice": {"type": "file_search"}}, 400, "file_search"),
        ({"input": "Hi", "reasoning": {"effort": "high"}}, 400, "effort"),
        ({"input": "Hi", "temperature": "1"}, 400, "temperature"),
        ({"input": "Hi", "text": {"format": {"type": "json_schema"}}}, 400, "name"),
        ({}, 400, "input"),
    ],
)
def test_bad_requests_name_the_field(
    client: httpx.Client, body: dict[str, Any], status: int, names: str
) -> None:
    r = client.post("/v1/responses", json={"model": "tiny-chat", **body})
    assert r.status_code == status, r.text
    payload = r.json()
    assert names in payload["error"] or names in str(payload["details"]), payload
    assert payload["details"]["endpoint"] == "/v1/responses"


def test_hosted_tools_are_dropped_and_never_echoed(client: httpx.Client) -> None:
    answer = create(
        client,
        model="tiny-chat",
        input="Hi",
        tools=[{"type": "web_search"}, WEATHER],
        max_output_tokens=16,
    )
    assert [t["type"] for t in answer["tools"]] == ["function"]
