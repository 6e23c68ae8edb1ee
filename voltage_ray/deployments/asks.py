"""The protocol's chat and completions requests as the backends take them: the conversation as
engine-neutral :class:`~voltage_ray.backends.chat_template.Turn` s, the tools as OpenAI's JSON,
and what the request asks of its tokens as one :class:`~voltage_ray.backends.chat.Asks` (its
constraint included), so that no backend reads a protocol model."""

from __future__ import annotations

from typing import Any

from voltage_ray.backends.chat import Asks, Prepared, Prompter
from voltage_ray.backends.chat_template import Call, Turn
from voltage_ray.backends.grammar import Constraint
from voltage_ray.protocol.chat import ChatCompletionRequest, ChatMessage
from voltage_ray.protocol.completions import CompletionRequest
from voltage_ray.protocol.tools import strict_schema


def prepare_chat(prompter: Prompter, request: ChatCompletionRequest) -> Prepared:
    """``request`` rendered, tokenized and its grammar compiled by ``prompter``."""
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    return prompter.prepare(turns(request.messages), tools, chat_asks(request))


def prepare_completion(
    prompter: Prompter, prompt: str | list[int], request: CompletionRequest
) -> Prepared:
    """One prompt of a legacy completions request, tokenized by ``prompter``."""
    return prompter.prepare_text(prompt, completion_asks(request))


def turns(messages: list[ChatMessage]) -> list[Turn]:
    return [
        Turn(
            role=str(m.role),
            text=m.text,
            name=m.name,
            tool_calls=tuple(
                Call(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []
            ),
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]


def chat_asks(request: ChatCompletionRequest) -> Asks:
    return _asks(
        request,
        max_tokens=request.requested_max_tokens,
        logprobs=request.top_logprobs_count,
        constraint=constraint_of(request),
    )


def completion_asks(request: CompletionRequest) -> Asks:
    return _asks(
        request,
        max_tokens=request.max_tokens,
        logprobs=request.logprobs,
        prompt_logprobs=request.logprobs if request.echo else None,
    )


def _asks(request: ChatCompletionRequest | CompletionRequest, **more: Any) -> Asks:
    """The fields chat and completions requests share; ``more``: the rest."""
    return Asks(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        stop=tuple(request.stop_list),
        seed=request.seed,
        logit_bias=request.logit_bias,
        **more,
    )


def constraint_of(request: ChatCompletionRequest) -> Constraint | None:
    """What a request's output must be: the forced tool call(s) (tool_choice required or a
    named function), else ``structured_outputs`` or ``response_format``; None for free text."""
    mode = request.tool_mode
    if mode == "named":
        (tool,) = request.forced_tools
        return Constraint.of(
            "tool_calls",
            strict_schema(tool.function.parameters_schema),
            f"tools[{tool.function.name}].parameters",
        )
    if mode == "required":
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "parameters": strict_schema(t.function.parameters_schema),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in request.forced_tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not request.parallel_tool_calls:
            schema["maxItems"] = 1
        return Constraint.of("tool_calls", schema, "tools")
    extension = request.structured_outputs
    if extension is not None:
        if extension.regex is not None:
            return Constraint.regex(extension.regex, "structured_outputs.regex")
        if extension.choice is not None:
            return Constraint.choice(extension.choice, "structured_outputs.choice")
        if extension.grammar is not None:
            return Constraint.lark(extension.grammar, "structured_outputs.grammar")
        return Constraint.of("json_schema", extension.json_ or {}, "structured_outputs.json")
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint.of("json_object", {"type": "object"}, "response_format")
    spec = fmt.json_schema
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    return Constraint.of("json_schema", strict_schema(schema), "response_format.json_schema.schema")
