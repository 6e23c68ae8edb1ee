"""`POST /responses` and `POST /responses/input_tokens` (OpenAI's Responses API): the requests.

OpenAI's `CreateResponse` and `TokenCountsBody` (openapi.yaml at openai/openai-openapi f85dbe2,
2026-08-21, the commit tests/schemas records); input items in `response_items`, tools in
`response_tools`, the output and its stream in `response_events`. Facts relied on: CreateResponse
has no required field (the API needs `model`, and `input` unless `previous_response_id` carries
the conversation); `max_output_tokens` >= 16; `top_logprobs` 0-20; `store` defaults to true
and `background` needs it; `truncation` is `auto` or `disabled`; `service_tier` adds `fast` and
`ultrafast` to chat's. Codex also sends `client_metadata`, a map of strings (its installation,
session and turn ids), which OpenAI's document does not list. Codex 0.171.0's requests
(tests/fixtures/codex_requests.json, captured) have no `instructions` (its prompt is a
developer message), `reasoning: {"summary": "auto"}`, `include: ["reasoning.encrypted_content"]`,
`store: false`, function tools with `strict: false`, a namespace and a `web_search` tool.

Honoured: the input, `instructions`, tools and `tool_choice`, `text.format`, sampling,
`max_output_tokens`, `truncation`, `parallel_tool_calls`, `include:
message.output_text.logprobs`, `stream`, `background` and `store` (the route's part).
Accepted and ignored (they ask nothing of the output): metadata, user, safety_identifier,
service_tier, the prompt cache fields, moderation, client_metadata, stream_options,
max_tool_calls (it caps hosted tool calls), the other `include` values (they add to reasoning
items, hosted tools' calls or input images, none of which this server makes), reasoning
`summary`/`context` (no reasoning, nothing to summarise). Refused, naming the field:
`conversation`, `prompt`, `context_management`, reasoning `effort` other than `none` (as chat's
`reasoning_effort`), `text.verbosity` other than `medium` (as chat's `verbosity`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from voltage_ray.protocol.chat import MAX_TOP_LOGPROBS
from voltage_ray.protocol.common import Metadata, RequestModel, ServiceTier, require_unicode
from voltage_ray.protocol.response_items import InputItem, InputParam, Message, check_readable
from voltage_ray.protocol.response_tools import (
    HOSTED,
    HOSTED_TOOL_TYPES,
    AllowedTools,
    CustomChoice,
    CustomTool,
    FunctionChoice,
    FunctionTool,
    HostedTool,
    NamespaceTool,
    OfferedTool,
    ToolChoiceParam,
    ToolParam,
    check_name,
)
from voltage_ray.protocol.tools import (
    FunctionName,
    JSONObjectFormat,
    JSONSchemaFormat,
    JSONSchemaSpec,
    NamedToolChoice,
    ResponseFormat,
    TextFormat,
    Tool,
    ToolChoice,
)

MIN_OUTPUT_TOKENS = 16
LOGPROBS_INCLUDE = "message.output_text.logprobs"
Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]


class JSONSchemaTextFormat(RequestModel):
    """`text.format` of type ``json_schema``: chat's ``response_format.json_schema``, flat."""

    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    _name = field_validator("name")(lambda cls, v: check_name(v, "json_schema name"))


TextFormatParam = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaTextFormat, Field(discriminator="type")
]


class TextParam(RequestModel):
    """`ResponseTextParam`: the text's format, and a verbosity the served models lack."""

    format: TextFormatParam | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "verbosity": ("the served models have no verbosity setting", ("medium",)),
    }


class ReasoningParam(RequestModel):
    """`Reasoning`. As chat's ``reasoning_effort``, only what a model that does not reason
    honours exactly: effort ``none``; any summary setting (there is nothing to summarise, so
    no reasoning item is made), context, and the standard mode."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # deprecated summary
    context: Literal["auto", "current_turn", "all_turns"] | None = None
    mode: str | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "effort": ("the served models do not reason before answering", ("none",)),
        "mode": ("the served models have one reasoning mode", ("standard",)),
    }


class ResponseStreamOptions(RequestModel):
    """`ResponseStreamOptions`. No obfuscation padding is added to deltas either way (it only
    hides their sizes from onlookers), so the option is ignored."""

    include_obfuscation: bool | None = None


# --- the request --------------------------------------------------------------------------


class ResponseInputs(RequestModel):
    """What both `POST /responses` and `POST /responses/input_tokens` read: the input, the
    tools and the text's form, with the checks and views they share."""

    input: InputParam | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool = True
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    conversation: str | dict[str, Any] | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "conversation": (
            "this server keeps no conversations: send previous_response_id, or the whole input",
            (),
        ),
    }

    _readable = field_validator("input", mode="before")(lambda cls, v: check_readable(v))

    @field_validator("instructions")
    @classmethod
    def _unicode(cls, v: str | None) -> str | None:
        require_unicode(v or "", "instructions")
        return v

    def _check_tools(self) -> None:
        names = [t.exposed for t in self.declared_tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tools: names must be unique; {', '.join(twice)} repeat")
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice | CustomChoice):
            self._declared(choice.type, choice.name, "tool_choice")
        if isinstance(choice, AllowedTools):
            for entry in choice.tools:
                self._allowed(entry)
        required = choice == "required" or (
            isinstance(choice, AllowedTools) and choice.mode == "required"
        )
        if required and not self.offered_tools:
            raise ValueError("tool_choice 'required' needs a function or custom tool to call")

    def _declared(self, kind: str, name: Any, where: str) -> None:
        known = [t.exposed for t in self.declared_tools if t.kind == kind]
        if name not in known:
            raise ValueError(
                f"{where} names the {kind} tool {name!r}, which is not one of the tools "
                f"({', '.join(known) or 'none given'})"
            )

    def _allowed(self, entry: dict[str, Any]) -> None:
        kind = entry.get("type")
        if kind in ("function", "custom"):
            self._declared(kind, entry.get("name"), "tool_choice.tools")
        elif kind == "namespace":
            spaces = {t.namespace for t in self.declared_tools}
            if entry.get("name") not in spaces - {None}:
                raise ValueError(f"tool_choice.tools names no declared namespace: {entry}")
        elif kind not in HOSTED_TOOL_TYPES:
            raise ValueError(f"tool_choice.tools: {entry} is not a tool")

    @property
    def items(self) -> list[InputItem]:
        """The input as items: text is one user message."""
        if isinstance(self.input, str):
            return [Message(role="user", content=self.input)]
        return list(self.input or [])

    @property
    def declared_tools(self) -> list[OfferedTool]:
        """Every function and custom tool, namespaces flattened, in the request's order."""
        out: list[OfferedTool] = []
        for tool in self.tools or []:
            if isinstance(tool, NamespaceTool):
                out += [OfferedTool.of(t, tool.name) for t in tool.tools]
            elif isinstance(tool, FunctionTool | CustomTool):
                out.append(OfferedTool.of(tool))
        return out

    @property
    def offered_tools(self) -> list[OfferedTool]:
        """The tools the model may call: the declared ones, less those ``allowed_tools``
        leaves out."""
        choice = self.tool_choice
        if not isinstance(choice, AllowedTools):
            return self.declared_tools
        keep = {(e.get("type"), e.get("name")) for e in choice.tools}
        return [
            t
            for t in self.declared_tools
            if (t.kind, t.exposed) in keep or ("namespace", t.namespace) in keep
        ]

    def tool(self, exposed: str) -> OfferedTool | None:
        """The declared tool the model calls ``exposed``."""
        return next((t for t in self.declared_tools if t.exposed == exposed), None)

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """As chat's: no calls, calls read from free text, or calls a grammar enforces."""
        choice = self.tool_choice
        if not self.declared_tools or choice == "none":
            return "none"
        if isinstance(choice, FunctionChoice | CustomChoice):
            return "named"
        if choice == "required" or (isinstance(choice, AllowedTools) and choice.mode == "required"):
            return "required"
        return "auto" if self.offered_tools else "none"

    @property
    def forced_tools(self) -> list[OfferedTool]:
        """The tools a call must be made to (required: any offered one; named: that one)."""
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice | CustomChoice):
            return [t for t in self.declared_tools if t.exposed == choice.name]
        return self.offered_tools if self.tool_mode == "required" else []

    def chat_tools(self) -> list[Tool] | None:
        """The offered tools as chat's function tools (custom ones take one string, ``input``)."""
        return [t.chat_tool() for t in self.offered_tools] or None

    @property
    def chat_tool_choice(self) -> ToolChoice:
        """``tool_choice`` in chat's terms, over :meth:`chat_tools`."""
        mode = self.tool_mode
        if mode == "named":
            return NamedToolChoice(
                type="function", function=FunctionName(name=self.forced_tools[0].exposed)
            )
        return mode

    @property
    def response_format(self) -> ResponseFormat | None:
        """``text.format`` as chat's ``response_format`` (None: free text)."""
        fmt = self.text.format if self.text else None
        if not isinstance(fmt, JSONSchemaTextFormat):
            return fmt
        spec = JSONSchemaSpec(
            name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict
        )
        return JSONSchemaFormat(type="json_schema", json_schema=spec)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the text must match (``json_object``: any object); None: free text."""
        fmt = self.text.format if self.text else None
        if isinstance(fmt, JSONSchemaTextFormat):
            return fmt.schema_
        return {"type": "object"} if isinstance(fmt, JSONObjectFormat) else None


class CreateResponseRequest(ResponseInputs):
    """OpenAI's `CreateResponse`, strict as chat's request (see the module's docstring)."""

    model: str
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    background: bool = False
    store: bool = True
    include: list[Includable] | None = None
    max_output_tokens: int | None = Field(default=None, ge=MIN_OUTPUT_TOKENS)
    max_tool_calls: int | None = Field(default=None, ge=0)  # caps hosted tool calls: none here
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI's, accepted and ignored: storage, billing, caching and tracing hints.
    metadata: Metadata | None = Field(default=None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    service_tier: ServiceTier | Literal["fast", "ultrafast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    client_metadata: dict[str, str] | None = None  # Extension (Codex's): its ids, for tracing
    # OpenAI's, refused unless they ask for what the server does anyway (REFUSED).
    prompt: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        **ResponseInputs.REFUSED,
        "prompt": ("this server stores no prompt templates", ()),
        "context_management": ("this server does not compact conversations", ()),
    }

    @model_validator(mode="after")
    def _consistent(self) -> CreateResponseRequest:
        if self.input is None and self.previous_response_id is None:
            raise ValueError("input is required")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.background and not self.store:
            raise ValueError("background requires store to be true: the answer is fetched later")
        self._check_tools()
        return self

    @property
    def logprobs(self) -> bool:
        """Whether output text carries logprobs (``include`` asks; ``top_logprobs`` alone
        does not, as with OpenAI)."""
        return LOGPROBS_INCLUDE in (self.include or [])

    @property
    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (0 to 20)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens


class InputTokensRequest(ResponseInputs):
    """OpenAI's `TokenCountsBody` (`POST /responses/input_tokens`): a request's input, counted."""

    model: str | None = None
    personality: str | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        **ResponseInputs.REFUSED,
        "personality": ("this server adds no personality prompt", ()),
    }

    @model_validator(mode="after")
    def _consistent(self) -> InputTokensRequest:
        self._check_tools()
        return self


def hosted_tools(request: ResponseInputs) -> list[str]:
    """The types of the hosted tools a request lists, in its order: never offered to the model.
    The route drops them (the default: Codex lists ``web_search`` in every request) or, where
    the app is so configured, refuses the request with :func:`hosted_tools_refusal`."""
    return [t.type for t in request.tools or [] if isinstance(t, HostedTool)]


def hosted_tools_refusal(request: ResponseInputs) -> str | None:
    """The message of the 400 for a request listing hosted tools; None if it lists none."""
    found = hosted_tools(request)
    if not found:
        return None
    kinds = list(dict.fromkeys(found))
    verb = "is" if len(kinds) == 1 else "are"
    return f"tools: {', '.join(kinds)} {verb} not supported: {HOSTED}"
