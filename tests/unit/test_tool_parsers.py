"""Tool calls read from text: whole answers and streams give the same calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from voltage_ray.backends.tool_parsers import (
    HermesParser,
    NamedParser,
    Parsed,
    RequiredParser,
    ToolParser,
    value_end,
)

HERMES = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris \\"}\\" x", "days": [1, 2]}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"arguments": {"q": 1}, "name": "search"}\n</tool_call>'
)


def streamed(parser: ToolParser, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    """Content and calls assembled from stream deltas, as an OpenAI client assembles them."""
    out = Parsed()
    for i in range(0, len(text), step):
        out.add(parser.push(text[i : i + step]))
    out.add(parser.finish())
    calls: dict[int, dict[str, Any]] = {}
    for d in out.calls:
        if d.id is not None:  # a call starts with its id and name, before any arguments
            assert d.index not in calls and d.name
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": d.arguments}
        else:
            calls[d.index]["arguments"] += d.arguments
    return out.content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 2, 5, 13, 10_000])
def test_hermes_streams_the_calls_whole_answers_have(step: int) -> None:
    content, calls = HermesParser().parse(HERMES)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Paris "}" x', "days": [1, 2]}),
        ("search", {"q": 1}),
    ]
    s_content, s_calls = streamed(HermesParser(), HERMES, step)
    assert s_content == content
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments) for c in calls]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in s_calls)


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer, no tools.",
        "An answer that mentions <tool but is no call",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": "x"}\n</tool_call>',  # arguments not an object
    ],
)
def test_hermes_text_without_valid_calls_is_content(text: str) -> None:
    assert HermesParser().parse(text) == (text, [])


def test_hermes_holds_back_a_partial_tag_and_releases_it_at_the_end() -> None:
    p = HermesParser()
    assert p.push("Hello <tool").content == "Hello "
    assert p.finish().content == "<tool"


REQUIRED = '[{"name": "a", "parameters": {"x": "}]"}}, {"name": "b", "parameters": {}}]'


@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_required_calls_stream_and_parse_alike(step: int) -> None:
    content, calls = RequiredParser().parse(REQUIRED)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("a", '{"x": "}]"}'),
        ("b", "{}"),
    ]
    assert streamed(RequiredParser(), REQUIRED, step)[1][1]["arguments"] == "{}"


def test_named_function_arguments_are_the_whole_text() -> None:
    content, calls = NamedParser("f").parse('{"q": [1, 2]}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"q": [1, 2]}')]
    _, s_calls = streamed(NamedParser("f"), '{"q": [1, 2]}', 2)
    assert s_calls[0]["name"] == "f" and s_calls[0]["arguments"] == '{"q": [1, 2]}'


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_a_cut_short_forced_call_stays_a_call_as_it_streamed(step: int) -> None:
    cut = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": "ab'
    content, calls = RequiredParser().parse(cut)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", '{"y": "ab')]
    _, s_calls = streamed(RequiredParser(), cut, step)
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments) for c in calls]
    content, calls = NamedParser("f").parse('{"q": [1')
    assert (content, [(c.name, c.arguments) for c in calls]) == ("", [("f", '{"q": [1')])


def test_a_cut_short_hermes_call_is_content() -> None:
    cut = '<tool_call>{"name": "a", "arguments": {"x": 1'
    assert HermesParser().parse(cut) == (cut, [])


@pytest.mark.parametrize(
    ("text", "end"),
    [('{"a": [1, "]"]} tail', 15), ('"x\\"y" ,', 6), ("123, ", 3), ("true}", 4), ("12", None)],
)
def test_value_end(text: str, end: int | None) -> None:
    assert value_end(text, 0) == end
