"""A choice's events in OpenAI's shape: content or tool calls, logprobs, finish reasons."""

from __future__ import annotations

from typing import Any

from voltage_ray.backends.chat import StepEvent, TokenLogprobs
from voltage_ray.backends.tool_parsers import HermesParser, NamedParser
from voltage_ray.deployments.chat_output import ChoiceOutput

VOCAB = {1: b"Hi", 2: b" there", 3: "\xe9".encode()[:1]}
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def token_bytes(token: int) -> bytes:
    return VOCAB[token]


def events(*texts: str, reason: str = "stop", scored: bool = False) -> list[StepEvent]:
    out = []
    for i, text in enumerate(texts):
        lp = [TokenLogprobs(1 + i % 3, -0.5, [(1 + i % 3, -0.5), (2, -1.5)])] if scored else []
        last = i == len(texts) - 1
        out.append(StepEvent(0, text, reason if last else None, i + 1, lp))
    return out


def whole(out: ChoiceOutput, evs: list[StepEvent]) -> dict[str, Any]:
    for ev in evs:
        out.add(ev)
    return out.choice().model_dump(mode="json")


def test_plain_text_with_logprobs() -> None:
    choice = whole(ChoiceOutput(0, None, token_bytes, True), events("Hi", " there", scored=True))
    assert choice["message"] == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hi", " there"]
    assert content[0]["bytes"] == list(b"Hi") and content[0]["top_logprobs"][1]["token"] == " there"
    assert choice["logprobs"]["refusal"] is None


def test_a_partial_utf8_token_keeps_its_bytes() -> None:
    choice = whole(ChoiceOutput(0, None, token_bytes, True), events("a", "b", "c", scored=True))
    third = choice["logprobs"]["content"][2]
    assert third["bytes"] == [0xC3] and third["token"] == "\ufffd"


def test_tool_calls_make_content_null_and_finish_with_tool_calls() -> None:
    choice = whole(
        ChoiceOutput(0, HermesParser(), token_bytes, False), events(CALL[:20], CALL[20:])
    )
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert choice["finish_reason"] == "tool_calls" and choice["logprobs"] is None


def test_a_forced_call_cut_by_length_stays_a_call_that_finished_by_length() -> None:
    """As OpenAI answers, and as the stream already sent it: the arguments written so far."""
    choice = whole(
        ChoiceOutput(0, NamedParser("f"), token_bytes, False), events('{"x": ', reason="length")
    )
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "f", "arguments": '{"x": '}
    assert choice["finish_reason"] == "length"


def test_streamed_tool_calls_come_as_openai_sends_them() -> None:
    out = ChoiceOutput(0, HermesParser(), token_bytes, True)
    chunks = [
        c.model_dump(mode="json")
        for ev in events(CALL[:25], CALL[25:], scored=True)
        for c in out.deltas(ev)
    ]
    deltas = [c["delta"] for c in chunks]
    assert deltas[0] == {
        "tool_calls": [
            {
                "index": 0,
                "id": deltas[0]["tool_calls"][0]["id"],
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert args == '{"x": 1}'
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:-1])
    assert deltas[-1] == {} and chunks[-1]["finish_reason"] == "tool_calls"
    scored = [c["logprobs"]["content"] for c in chunks if c["logprobs"] is not None]
    assert sum(len(s) for s in scored) == 2  # every token's logprobs, once
