"""Chat messages, tools and tool history rendered through a model's chat template.

Templates that know tools (they read a ``tools`` variable, as Qwen2.5's and Llama 3.1's do) get
OpenAI's tools and messages as Hugging Face's chat templating expects them
(``apply_chat_template(messages, tools=...)``, tool call arguments as objects). Templates without
tool support (SmolLM2-135M-Instruct's, the tiny test model's) get the documented fallback, the
Hermes convention that Qwen2.5 uses and SmolLM2 was trained on: the tools listed in the system
message inside ``<tools></tools>``, earlier calls as ``<tool_call>{"name", "arguments"}
</tool_call>`` in the assistant's text, and tool results as a user turn of
``<tool_response>...</tool_response>`` blocks. A ``developer`` message is a system message
where the template has no developer role.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HERMES_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_source(tokenizer: Any) -> str:
    template = tokenizer.chat_template or ""
    return template if isinstance(template, str) else " ".join(map(str, template.values()))


def knows_tools(tokenizer: Any) -> bool:
    """Does the model's chat template render ``tools`` (and so tool calls and tool messages)?"""
    return "tools" in template_source(tokenizer)


@dataclass(frozen=True)
class Call:
    """A tool call an assistant turn made: its id, function name and arguments (JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, engine-neutral (``deployments/asks.py`` makes them from
    the protocol's messages): its role, text, optional author name, the tool calls an assistant
    turn made, and the call a tool turn answers."""

    role: str
    text: str
    name: str | None = None
    tool_calls: tuple[Call, ...] = ()
    tool_call_id: str | None = None


def render(
    tokenizer: Any, messages: Sequence[Turn], tools: Sequence[dict[str, Any]] = ()
) -> list[int]:
    """Token ids of ``messages`` with ``tools`` (function tools as OpenAI's JSON: ``{"type":
    "function", "function": {...}}``), ending with the assistant's generation prompt."""
    source = template_source(tokenizer)
    developer = "developer" in source
    tool_dicts = list(tools)
    if knows_tools(tokenizer):
        entries = [_native(m, developer) for m in messages]
        extra: dict[str, Any] = {"tools": tool_dicts} if tool_dicts else {}
    else:
        entries = _hermes(messages, tool_dicts, developer)
        extra = {}
    ids = tokenizer.apply_chat_template(entries, add_generation_prompt=True, tokenize=True, **extra)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _role(message: Turn, developer: bool) -> str:
    role = message.role
    return "system" if role == "developer" and not developer else role


def _arguments(text: str) -> Any:
    """Tool call arguments as an object where they parse (templates expect objects)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native(message: Turn, developer: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": _role(message, developer), "content": message.text}
    if message.name:
        entry["name"] = message.name
    if message.role == "assistant" and message.tool_calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        entry["tool_call_id"] = message.tool_call_id
    return entry


def _hermes(
    messages: Sequence[Turn], tools: list[dict[str, Any]], developer: bool
) -> list[dict[str, Any]]:
    """The fallback for templates without tool support: plain system/user/assistant turns."""
    entries: list[dict[str, Any]] = []
    for m in messages:
        role = _role(m, developer)
        if role == "tool":
            block = f"<tool_response>\n{m.text}\n</tool_response>"
            last = entries[-1] if entries else None
            if last is not None and last.get("_tool"):  # one user turn for consecutive results
                last["content"] += "\n" + block
            else:
                entries.append({"role": "user", "content": block, "_tool": True})
            continue
        text = m.text
        if role == "assistant" and m.tool_calls:
            calls = [
                json.dumps({"name": c.name, "arguments": _arguments(c.arguments)})
                for c in m.tool_calls
            ]
            blocks = "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)
            text = f"{text}\n{blocks}" if text else blocks
        entry: dict[str, Any] = {"role": role, "content": text}
        if m.name:
            entry["name"] = m.name
        entries.append(entry)
    for entry in entries:
        entry.pop("_tool", None)
    if tools:
        prompt = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if entries and entries[0]["role"] == "system":
            entries[0]["content"] = f"{entries[0]['content']}\n\n{prompt}"
        else:
            entries.insert(0, {"role": "system", "content": prompt})
    return entries
