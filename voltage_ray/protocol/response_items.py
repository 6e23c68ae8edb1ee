"""The input items of a Responses request (OpenAI's `InputItem`), and their chat messages.

OpenAI's shapes (openapi.yaml at openai/openai-openapi f85dbe2): `EasyInputMessage`,
`InputMessage` and earlier `OutputMessage`s, `FunctionToolCall`, `FunctionCallOutputItemParam`,
`CustomToolCall`, `CustomToolCallOutput`, `ReasoningItem`, `ItemReferenceParam`. An item without
`type` is a message where it has a `role`, else an item reference. The served models read text:
image, file and audio parts are 400s naming the part, as are the items of OpenAI's hosted tools;
reasoning items are accepted and dropped. Fields that only describe an item (ids, statuses,
annotations, `caller`) are accepted and unread.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from voltage_ray.protocol.chat import ChatMessage
from voltage_ray.protocol.common import RequestModel, ResponseModel, require_unicode
from voltage_ray.protocol.tools import FunctionCallIn, ToolCallIn

UNREADABLE_PARTS = ("input_image", "input_file", "input_audio")
# Items that OpenAI's hosted and special tools make: nothing here made them, nothing reads them.
UNREAD_ITEMS = (
    *("file_search_call", "computer_call", "computer_call_output", "web_search_call"),
    *("image_generation_call", "code_interpreter_call", "local_shell_call"),
    *("local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call"),
    *("apply_patch_call_output", "mcp_list_tools", "mcp_approval_request"),
    *("mcp_approval_response", "mcp_call", "tool_search_call", "tool_search_output"),
    *("additional_tools", "compaction", "compaction_trigger", "program", "program_output"),
)
ItemStatus = Literal["in_progress", "completed", "incomplete"]
_ID_CHARS = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """An id in OpenAI's shape (its example ids): ``resp_``, ``msg_``, ``fc_``, ``ctc_``, ...
    then 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def new_call_id() -> str:
    """A ``call_id`` as OpenAI's, and chat's tool call ids here: ``call_`` + 24 letters/digits."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


class InputText(RequestModel):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # OpenAI's caching hint, ignored


class OutputText(RequestModel):
    """An earlier answer's text, in an assistant message; its annotations and logprobs unread."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(RequestModel):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]


def text_or_list(value: Any) -> str:
    """The tag of a value that is text or a list: one branch checked, one short error path."""
    return "text" if isinstance(value, str) else "list"


Content = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[Part], Tag("list")], Discriminator(text_or_list)
]


class Message(RequestModel):
    """OpenAI's `EasyInputMessage` and `InputMessage`, or an earlier answer (`OutputMessage`):
    ``content`` as text or text parts; output text and refusals belong to assistant messages."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _fits_role(self) -> Message:
        parts = self.content if isinstance(self.content, list) else []
        if self.role != "assistant" and any(not isinstance(p, InputText) for p in parts):
            raise ValueError("output_text and refusal parts belong to assistant messages")
        require_unicode(self.text, "content")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.content)


class FunctionCall(RequestModel):
    """An earlier call of a function tool (`FunctionToolCall`): ``arguments`` is JSON text."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None
    id: str | None = None
    status: ItemStatus | None = None
    caller: dict[str, Any] | None = None


ToolOutput = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[InputText], Tag("list")],
    Discriminator(text_or_list),
]


def _output_text(output: ToolOutput) -> str:
    return output if isinstance(output, str) else "".join(p.text for p in output)


class FunctionCallOutput(RequestModel):
    """What the client's function returned (`FunctionCallOutputItemParam`), as text."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=64)
    output: ToolOutput
    name: str | None = None
    namespace: str | None = None
    id: str | None = None
    status: ItemStatus | None = None
    caller: dict[str, Any] | None = None


class CustomToolCall(RequestModel):
    """An earlier call of a custom tool: ``input`` is the tool's free-form text."""

    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None
    id: str | None = None
    status: ItemStatus | None = None
    caller: dict[str, Any] | None = None


class CustomToolCallOutput(RequestModel):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: ToolOutput
    id: str | None = None
    status: ItemStatus | None = None
    caller: dict[str, Any] | None = None


class ReasoningItem(RequestModel):
    """An earlier answer's reasoning (`ReasoningItem`): accepted and dropped, as the served
    models neither read nor write it (Codex sends these back without their ``id``)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] | None = None
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: ItemStatus | None = None


class ItemReference(RequestModel):
    """`ItemReferenceParam`: a stored item named by its id, which the route resolves (from the
    responses it stored) before the input reaches the model."""

    type: Literal["item_reference"] | None = "item_reference"
    id: str


def _item_kind(value: Any) -> Any:
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is None:
            return "message" if "role" in value else "item_reference"
        return kind
    return getattr(value, "type", None) or "item_reference"


InputItem = Annotated[
    Annotated[Message, Tag("message")]
    | Annotated[FunctionCall, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")]
    | Annotated[CustomToolCall, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutput, Tag("custom_tool_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(_item_kind),
]
InputParam = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[InputItem], Tag("list")],
    Discriminator(text_or_list),
]


def check_readable(items: Any) -> Any:
    """A 400 naming the first item or content part the served models cannot read (images,
    files, audio; hosted tools' items), before the items' shapes are checked."""
    if not isinstance(items, list):
        return items
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in UNREAD_ITEMS:
            raise ValueError(
                f"input[{i}]: {kind} items are not supported: OpenAI's hosted tools make "
                "them, and this server runs none"
            )
        key = "content" if _item_kind(item) == "message" else "output"
        parts = item.get(key)
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            if isinstance(part, dict) and part.get("type") in UNREADABLE_PARTS:
                raise ValueError(
                    f"input[{i}].{key}[{j}]: {part['type']} is not supported: "
                    "the served models read text only"
                )
    return items


def chat_messages(items: Sequence[InputItem], instructions: str | None = None) -> list[ChatMessage]:
    """The chat messages of a response's ``instructions`` (a system message) and input items.

    Calls join the assistant message before them (or start one), by their exposed names, a
    custom tool's text as its ``input`` argument (``response_tools.CUSTOM_INPUT_SCHEMA``);
    their outputs become tool messages. Reasoning items are dropped. Item references must have
    been resolved: a ValueError otherwise.
    """
    out = [ChatMessage(role="system", content=instructions)] if instructions else []
    for item in items:
        if isinstance(item, Message):
            out.append(ChatMessage(role=item.role, content=item.text))
        elif isinstance(item, FunctionCall | CustomToolCall):
            _add_call(out, item)
        elif isinstance(item, FunctionCallOutput | CustomToolCallOutput):
            text = _output_text(item.output)
            out.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=text))
        elif isinstance(item, ItemReference):
            raise ValueError(f"item_reference {item.id} was not resolved")
    return out


def _add_call(messages: list[ChatMessage], item: FunctionCall | CustomToolCall) -> None:
    name = f"{item.namespace}.{item.name}" if item.namespace else item.name
    if isinstance(item, FunctionCall):
        arguments = item.arguments
    else:
        arguments = json.dumps({"input": item.input}, ensure_ascii=False)
    call = ToolCallIn(
        id=item.call_id, type="function", function=FunctionCallIn(name=name, arguments=arguments)
    )
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or []), call]
    else:
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))


# --- the stored input ---------------------------------------------------------------------


def item_resource(item: InputItem) -> dict[str, Any]:
    """An input item as `GET /responses/{id}/input_items` lists it (OpenAI's `ItemResource`),
    with an id and a status where the client sent none: make these once, when the input is
    stored, so that the ids stay put. Item references must have been resolved."""
    if isinstance(item, ItemReference):
        raise ValueError(f"item_reference {item.id} was not resolved")
    if isinstance(item, Message):
        return _message_resource(item)
    if isinstance(item, ReasoningItem):
        data = item.model_dump(exclude_none=True)
        return {**data, "id": item.id or new_id("rs"), "summary": item.summary or []}
    prefix = {
        "function_call": "fc",
        "function_call_output": "fco",
        "custom_tool_call": "ctc",
        "custom_tool_call_output": "ctco",
    }[item.type]
    data = item.model_dump(exclude_none=True)
    return {**data, "id": item.id or new_id(prefix), "status": item.status or "completed"}


def _message_resource(item: Message) -> dict[str, Any]:
    content = item.content
    parts = [InputText(type="input_text", text=content)] if isinstance(content, str) else content
    return {
        "id": item.id or new_id("msg"),
        "type": "message",
        "role": item.role,
        "status": item.status or "completed",
        "content": [_part_resource(p, item.role == "assistant") for p in parts],
    }


def _part_resource(part: InputText | OutputText | Refusal, assistant: bool) -> dict[str, Any]:
    """A part as OpenAI lists it: an answer's text as `output_text`, all else `input_text`."""
    if isinstance(part, Refusal):
        return {"type": "refusal", "refusal": part.refusal}
    if assistant:
        return {"type": "output_text", "text": part.text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": part.text}


class ResponseItemList(ResponseModel):
    """OpenAI's `ResponseItemList`: a page of a stored response's input items. The schema types
    ``first_id`` and ``last_id`` as strings; an empty page has them null, as OpenAI's lists."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def page(
        cls,
        items: Sequence[dict[str, Any]],
        *,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> ResponseItemList:
        """The page of ``items`` (resources, in input order) that the query asks for: newest
        first by default, as OpenAI's; a ValueError where ``after`` names none of them."""
        ordered = list(items) if order == "asc" else list(reversed(items))
        if after is not None:
            ids = [i["id"] for i in ordered]
            if after not in ids:
                raise ValueError(f"after: {after!r} is none of this response's input items")
            ordered = ordered[ids.index(after) + 1 :]
        data = ordered[:limit]
        return cls(
            data=data,
            has_more=len(ordered) > limit,
            first_id=data[0]["id"] if data else None,
            last_id=data[-1]["id"] if data else None,
        )
