from __future__ import annotations

import pytest
from pydantic import ValidationError

from voltage_ray.protocol.chat import ChatCompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_follow_the_spec() -> None:
    r = ChatCompletionRequest(model="gpt-4", messages=MSG)
    assert (r.temperature, r.top_p, r.n, r.stream) == (1.0, 1.0, 1, False)
    assert (r.presence_penalty, r.frequency_penalty, r.max_tokens) == (0.0, 0.0, None)


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": 2.1},
        {"temperature": -0.1},
        {"top_p": 1.5},
        {"n": 0},
        {"n": 11},
        {"max_tokens": 0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ""},
        {"stream_options": {"include_usage": True}},
        {"logit_bias": {}},
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "a\ud800b"}]},
        {"stop": ["ok", "\udfff"]},
    ],
)
def test_out_of_contract_values_are_rejected(field: dict[str, object]) -> None:
    body: dict[str, object] = {"model": "gpt-4", "messages": MSG}
    body.update(field)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_openai_extensions_are_accepted() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "gpt-4",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 3,
            "max_completion_tokens": 5,
            "user": "u",
            "stop": "END",
        }
    )
    assert r.include_usage and r.requested_max_tokens == 5 and r.stop_list == ["END"]
    assert r.messages[0].text == "a"
