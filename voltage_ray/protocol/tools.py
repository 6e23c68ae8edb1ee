"""What a chat request may ask of its output's shape: tools, tool_choice and response_format.

OpenAI's own field names and shapes (the spec is silent on all of them). Only function tools
exist here; JSON schemas are kept as the client sent them (``schema_`` aliases ``schema``, a name
pydantic reserves) and checked where they are compiled into a grammar (``backends/grammar.py``).
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from voltage_ray.protocol.common import RequestModel, ResponseModel

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
NAME_RULE = "must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes"


def _check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(f"{what} {value!r} {NAME_RULE}")
    return value


class FunctionDefinition(RequestModel):
    """OpenAI's `FunctionObject`: a function the model may call."""

    name: str
    description: str | None = None
    # A JSON schema object; omitted means a function that takes no arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "function name")

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object"}


class Tool(RequestModel):
    """OpenAI's `ChatCompletionTool` (function tools only)."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call exactly this one."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(RequestModel):
    """A call an assistant message made earlier: ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str


class ToolCallIn(RequestModel):
    """An earlier assistant message's tool call (OpenAI's `ChatCompletionMessageToolCall`)."""

    id: str
    type: Literal["function"]
    function: FunctionCallIn


class TextFormat(RequestModel):
    type: Literal["text"]


class JSONObjectFormat(RequestModel):
    """Any JSON object (OpenAI's JSON mode)."""

    type: Literal["json_object"]


class JSONSchemaSpec(RequestModel):
    """OpenAI's `JSONSchema`: ``name`` identifies it, ``schema`` is what the output must match."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "json_schema name")


class JSONSchemaFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")
]


class StructuredOutputs(RequestModel):
    """Extension (vLLM's ``structured_outputs``, as vLLM clients send it in ``extra_body``):
    the text must match a regular expression, be one of ``choice``, match a JSON schema, or
    match a Lark ``grammar``. Exactly one of them."""

    json_: dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)  # Lark, as vLLM's guidance backend

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [v for v in (self.json_, self.regex, self.choice, self.grammar) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice and grammar"
            )
        return self


# --- responses ------------------------------------------------------------------------------


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(ResponseModel):
    """A tool call in a response message (OpenAI's `ChatCompletionMessageToolCall`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


# --- schemas ---------------------------------------------------------------------------------

# Keywords whose value is a schema or a list of them, and those whose value maps names to schemas.
_SUBSCHEMAS = (
    *("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "not"),
    *("if", "then", "else", "contains"),
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which every object schema that does not say whether it takes
    other properties gets ``additionalProperties: false``, as OpenAI's strict mode reads it.

    An object schema has ``properties`` or ``type: object``; an explicit ``additionalProperties``
    (true, false or a schema) is left alone. The walk goes through every place a subschema can
    be. Members of an ``allOf`` of several are not closed themselves (together they describe one
    object, and a closed member would refuse the others' properties); their own subschemas are.
    Pure: the argument is not changed, nor shared with the copy.
    """
    return _strict(schema, close=True)


def _strict(node: Any, *, close: bool) -> Any:
    if isinstance(node, list):
        return [_strict(item, close=True) for item in node]
    if not isinstance(node, dict):
        return node  # a boolean schema, or a keyword's plain value
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SUBSCHEMAS:
            out[key] = _strict(value, close=True)
        elif key == "allOf" and isinstance(value, list):
            out[key] = [_strict(item, close=len(value) == 1) for item in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _strict(item, close=True) for name, item in value.items()}
        else:
            out[key] = copy.deepcopy(value)
    kind = node.get("type")
    is_object = (
        "properties" in node or kind == "object" or (isinstance(kind, list) and "object" in kind)
    )
    if close and is_object and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out
