"""A request's constraint: what it is, how it compiles (and fails to), the cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.backends.chat import Prompter
from voltage_ray.backends.grammar import Constraint
from voltage_ray.config import ChatSettings
from voltage_ray.deployments.asks import constraint_of, prepare_chat
from voltage_ray.errors import BadRequest
from voltage_ray.protocol.chat import ChatCompletionRequest

CACHE = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)
MSG = [{"role": "user", "content": "hi"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "now"}},
]


def request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


@pytest.fixture(scope="module")
def prompter() -> Prompter:
    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource

    location = materialize(BuiltinSource(builtin="tiny-llama"), CACHE)
    return Prompter(location, ChatSettings(max_context=512))


def test_no_constraint_for_free_text_and_auto_tools() -> None:
    assert constraint_of(request()) is None
    assert constraint_of(request(response_format={"type": "text"})) is None
    assert constraint_of(request(tools=TOOLS)) is None
    assert constraint_of(request(tools=TOOLS, tool_choice="none")) is None


def test_response_formats() -> None:
    c = constraint_of(request(response_format={"type": "json_object"}))
    assert c is not None and (c.kind, c.schema_dict) == ("json_object", {"type": "object"})
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    c = constraint_of(request(response_format=fmt))
    assert c is not None and c.kind == "json_schema"
    assert list(c.schema_dict["properties"]) == ["b", "a"]  # the client's order is kept
    assert c.schema_dict["additionalProperties"] is False  # strict by default
    open_schema = {**schema, "additionalProperties": True}  # unless the schema says otherwise
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": open_schema}}
    c = constraint_of(request(response_format=fmt))
    assert c is not None and c.schema_dict["additionalProperties"] is True


def test_forced_tool_calls() -> None:
    named = constraint_of(
        request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}})
    )
    # Strict by default: an object schema silent on other properties takes none.
    closed = {"type": "object", "additionalProperties": False}
    assert named is not None and named.schema_dict == closed
    required = constraint_of(request(tools=TOOLS, tool_choice="required"))
    assert required is not None and required.kind == "tool_calls"
    schema = required.schema_dict
    assert schema["minItems"] == 1 and "maxItems" not in schema
    names = [alt["properties"]["name"]["const"] for alt in schema["items"]["anyOf"]]
    assert names == ["get_weather", "now"]
    parameters = schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert parameters == {**PARAMS, "additionalProperties": False}
    single = constraint_of(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert single is not None and single.schema_dict["maxItems"] == 1


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "strange"}, "Invalid type"),
        ({"$ref": "#/definitions/missing"}, "does not exist"),
        ({"if": {"type": "string"}, "then": {}}, "Unimplemented keys"),
        ({"type": "string", "pattern": "[a-"}, "regex"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "Unsatisfiable"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_why(
    prompter: Prompter, schema: dict[str, Any], words: str
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(BadRequest) as info:
        prepare_chat(prompter, request(response_format=fmt))
    assert "response_format.json_schema.schema" in info.value.message
    assert words in info.value.message


def test_a_bad_tool_schema_is_a_400_naming_the_tool(prompter: Prompter) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    choice = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(BadRequest, match=r"tools\[f\]\.parameters"):
        prepare_chat(prompter, request(tools=tools, tool_choice=choice))


def test_prepared_carries_what_the_request_asks_of_its_tokens(prompter: Prompter) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": PARAMS}}
    p = prepare_chat(
        prompter,
        request(response_format=fmt, logprobs=True, top_logprobs=3, logit_bias={"7": -100}),
    )
    assert p.logprobs == 3 and p.logit_bias == {7: -100.0}
    closed = {**PARAMS, "additionalProperties": False}  # strict by default
    assert p.constraint == Constraint.of(
        "json_schema", closed, "response_format.json_schema.schema"
    )
    plain = prepare_chat(prompter, request(logprobs=True))
    assert plain.logprobs == 0 and plain.constraint is None and plain.logit_bias == {}
    assert prepare_chat(prompter, request()).logprobs is None


def test_logit_bias_outside_the_vocabulary_is_a_400(prompter: Prompter) -> None:
    with pytest.raises(BadRequest, match="outside this model's vocabulary"):
        prepare_chat(prompter, request(logit_bias={str(prompter.vocab_size): 1}))


def test_compiled_grammars_are_cached(prompter: Prompter) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["a"]}}}
    c = Constraint.of("json_schema", schema, "response_format")
    first = prompter.grammars.compile(c)
    count = prompter.grammars.cached()
    again = prompter.grammars.compile(Constraint.of("json_schema", c.schema_dict, "x"))
    assert again is first and prompter.grammars.cached() == count
    rows = [prompter.grammars.matcher(c) for _ in range(2)]  # each row its own matcher
    rows[0].consume(int(prompter.tokenizer.encode("{", add_special_tokens=False)[0]))
    assert not bool(rows[1].allowed()[prompter.tokenizer.encode("}", add_special_tokens=False)[0]])


def test_the_structured_outputs_extension(prompter: Prompter) -> None:
    regex = constraint_of(request(structured_outputs={"regex": "(yes|no)!"}))
    assert regex == Constraint.regex("(yes|no)!", "structured_outputs.regex")
    choice = constraint_of(request(structured_outputs={"choice": ["a b", 'q"uote']}))
    assert choice is not None and choice.choices == ["a b", 'q"uote']
    schema = constraint_of(request(structured_outputs={"json": PARAMS}))
    assert schema is not None and schema.schema_dict == PARAMS
    for c in (regex, choice, schema):
        assert c is not None and prompter.grammars.compile(c) is not None
    tokens = prompter.tokenizer.encode('q"uote', add_special_tokens=False)
    row = prompter.grammars.matcher(choice)  # type: ignore[arg-type]
    for t in tokens:
        assert bool(row.allowed()[t])
        row.consume(t)
    assert row.done
    with pytest.raises(BadRequest, match=r"structured_outputs\.regex cannot be enforced"):
        prepare_chat(prompter, request(structured_outputs={"regex": "[a-"}))
