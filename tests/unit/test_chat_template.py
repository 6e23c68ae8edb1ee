"""Messages, tools and tool history through chat templates: tool-aware ones and the fallback."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.backends import chat_template
from voltage_ray.deployments.asks import turns
from voltage_ray.protocol.chat import ChatCompletionRequest

CACHE = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)

# A Qwen2.5-style template that renders tools, tool calls and tool results itself.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};"
    "{% endfor %}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}"
    "[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{% endif %}"
    "{%- if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import BuiltinSource

    return AutoTokenizer.from_pretrained(materialize(BuiltinSource(builtin="tiny-llama"), CACHE))


def rendered(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None) -> str:
    body: dict[str, Any] = {"model": "m", "messages": messages}
    if tools:
        body["tools"] = tools
    r = ChatCompletionRequest.model_validate(body)
    ids = chat_template.render(
        tokenizer, turns(r.messages), [t.model_dump(exclude_none=True) for t in r.tools or []]
    )
    return str(tokenizer.decode(ids))


def test_the_fallback_renders_tools_calls_and_results_the_hermes_way(tokenizer: Any) -> None:
    assert not chat_template.knows_tools(tokenizer)
    text = rendered(tokenizer, HISTORY, TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # developer -> system
    assert json.dumps(TOOLS[0]) in system and "<tool_call>" in system
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Rome"}}\n</tool_call><|im_end|>'
    ) in text
    # Consecutive tool results: one user turn.
    assert (
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n"
        "<tool_response>\n24C\n</tool_response><|im_end|>"
    ) in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_fallback_adds_a_system_turn_for_tools_when_there_is_none(tokenizer: Any) -> None:
    text = rendered(tokenizer, [{"role": "user", "content": "hi"}], TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert rendered(tokenizer, [{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")


def test_a_tool_aware_template_gets_tools_and_messages_as_they_are(tokenizer: Any) -> None:
    import copy

    aware = copy.copy(tokenizer)
    aware.chat_template = TOOL_TEMPLATE
    assert chat_template.knows_tools(aware)
    text = rendered(aware, HISTORY, TOOLS)
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;<|im_end|>")
    assert '[call get_weather {"city": "Paris"}]' in text  # arguments as an object
    assert "<|im_start|>tool\n18C[for call_1]<|im_end|>" in text
    assert "<|im_start|>system\nBe brief." in text  # no developer role in this template
