"""The tools of a Responses request (OpenAI's `Tool`) and its `tool_choice`.

OpenAI's shapes (openapi.yaml at openai/openai-openapi f85dbe2): `FunctionTool` (whose unset
`strict` the Responses API reads as true, unlike chat), `CustomToolParam` (free-form text, or text
matching a Lark grammar or a regex), `NamespaceToolParam` (a named group of function and custom
tools, as Codex sends them: openai/codex `codex-rs/tools/src/responses_api.rs` @074b769), the
hosted tools OpenAI runs (web and file search, MCP, code interpreter, ...), and `ToolChoiceParam`.

A namespaced tool is shown to the model as ``namespace.name``: dots are in no tool or namespace
name, so the split back is exact (OpenAI's own models call ``functions.name`` so). Hosted tools
are typed, their other fields unread, and never offered to the model; forcing one is a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from voltage_ray.protocol.common import RequestModel
from voltage_ray.protocol.tools import NAME, NAME_RULE, FunctionDefinition, Tool

HOSTED = "this server runs none of OpenAI's hosted tools"
HostedToolType = Literal[
    "file_search",
    "computer",
    "computer_use_preview",
    "web_search",
    "web_search_2025_08_26",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "mcp",
    "code_interpreter",
    "programmatic_tool_calling",
    "image_generation",
    "local_shell",
    "shell",
    "tool_search",
    "apply_patch",
]
HOSTED_TOOL_TYPES: tuple[str, ...] = get_args(HostedToolType)


def check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(f"{what} {value!r} {NAME_RULE}")
    return value


class FunctionTool(RequestModel):
    """OpenAI's `FunctionTool` (`FunctionToolParam` inside a namespace). ``strict`` unset means
    true here. ``defer_loading`` is ignored: such tools are offered like the others, since no
    tool search runs here to load them. ``allowed_callers`` and ``output_schema`` are unread."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    output_schema: dict[str, Any] | None = None

    _name = field_validator("name")(lambda cls, v: check_name(v, "function name"))


class CustomTextFormat(RequestModel):
    type: Literal["text"]


class CustomGrammarFormat(RequestModel):
    """The input must match ``definition``, a Lark grammar or a regular expression."""

    type: Literal["grammar"]
    syntax: Literal["lark", "regex"]
    definition: str = Field(min_length=1)


CustomFormat = Annotated[CustomTextFormat | CustomGrammarFormat, Field(discriminator="type")]


class CustomTool(RequestModel):
    """OpenAI's `CustomToolParam`: a tool called with free-form text rather than JSON."""

    type: Literal["custom"]
    name: str
    description: str | None = None
    format: CustomFormat | None = None
    defer_loading: bool | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None

    _name = field_validator("name")(lambda cls, v: check_name(v, "custom tool name"))


class NamespaceTool(RequestModel):
    """OpenAI's `NamespaceToolParam` (Codex's tool groups): its tools are offered as
    ``namespace.name``, and a call of one comes back with ``name`` and ``namespace`` apart."""

    type: Literal["namespace"]
    name: str
    description: str
    tools: list[Annotated[FunctionTool | CustomTool, Field(discriminator="type")]] = Field(
        min_length=1
    )

    _name = field_validator("name")(lambda cls, v: check_name(v, "namespace name"))


class HostedTool(RequestModel):
    """One of OpenAI's hosted tools (web search, file search, MCP, ...), which OpenAI runs and
    this server does not: typed, its other fields unread, never offered to the model."""

    model_config = ConfigDict(extra="allow")

    type: HostedToolType


def _tool_kind(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "hosted" if kind in HOSTED_TOOL_TYPES else kind


ToolParam = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[CustomTool, Tag("custom")]
    | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_kind),
]

# A custom tool, offered as a function for chat templates and tool parsers that know only JSON
# calls, takes its text as this one argument.
CUSTOM_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class OfferedTool:
    """A function or custom tool as the model sees it: :attr:`exposed` is its name there
    (``namespace.name`` inside a namespace)."""

    kind: Literal["function", "custom"]
    name: str
    namespace: str | None
    description: str | None
    parameters: dict[str, Any] | None = None  # a function's
    strict: bool = True  # a function's
    format: CustomTextFormat | CustomGrammarFormat | None = None  # a custom tool's

    @classmethod
    def of(cls, tool: FunctionTool | CustomTool, namespace: str | None = None) -> OfferedTool:
        if isinstance(tool, FunctionTool):
            strict = tool.strict is not False
            return cls("function", tool.name, namespace, tool.description, tool.parameters, strict)
        return cls("custom", tool.name, namespace, tool.description, format=tool.format)

    @property
    def exposed(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name

    @property
    def parameters_schema(self) -> dict[str, Any]:
        if self.kind == "custom":
            return CUSTOM_INPUT_SCHEMA
        return self.parameters if self.parameters is not None else {"type": "object"}

    def chat_tool(self) -> Tool:
        """This tool as chat's function tool. Built unchecked: a namespaced name holds a dot,
        which chat's names may not, and its parts were checked here."""
        function = FunctionDefinition.model_construct(
            name=self.exposed,
            description=self.description,
            parameters=self.parameters_schema,
            strict=self.strict if self.kind == "function" else None,
        )
        return Tool.model_construct(type="function", function=function)


def custom_input(arguments: str) -> str:
    """A custom tool's text from the JSON arguments of its call as a function
    (:data:`CUSTOM_INPUT_SCHEMA`); text that is not such JSON is taken as the input itself."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return str(value["input"])
    return arguments


class FunctionChoice(RequestModel):
    """`ToolChoiceFunction`: call this function (``namespace.name`` for a namespaced one)."""

    type: Literal["function"]
    name: str


class CustomChoice(RequestModel):
    type: Literal["custom"]
    name: str


class AllowedTools(RequestModel):
    """`ToolChoiceAllowed`: only these tools, each ``{"type": "function"|"custom", "name"}`` or
    ``{"type": "namespace", "name"}``; hosted tools listed here are never offered anyway."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class HostedChoice(RequestModel):
    """Forcing a hosted tool (`ToolChoiceTypes`, `ToolChoiceMCP`, ...): a 400, as none is
    offered here, so none can be called."""

    model_config = ConfigDict(extra="allow")

    type: Literal[
        "file_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "computer",
        "computer_use",
        "computer_use_preview",
        "image_generation",
        "code_interpreter",
        "mcp",
        "programmatic_tool_calling",
        "apply_patch",
        "shell",
    ]

    @model_validator(mode="after")
    def _cannot_force(self) -> HostedChoice:
        raise ValueError(f"tool_choice {self.type} is not supported: {HOSTED}")


def _choice_kind(value: Any) -> Any:
    if not isinstance(value, dict | RequestModel):
        return "mode"  # a string, or what will fail as one
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function", "custom", "allowed_tools") else "hosted"


ToolChoiceParam = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")]
    | Annotated[FunctionChoice, Tag("function")]
    | Annotated[CustomChoice, Tag("custom")]
    | Annotated[AllowedTools, Tag("allowed_tools")]
    | Annotated[HostedChoice, Tag("hosted")],
    Discriminator(_choice_kind),
]
