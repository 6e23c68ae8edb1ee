"""The Responses route's own decisions that need no model: hosted tools dropped or refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from voltage_ray.config import ResponsesConfig
from voltage_ray.errors import BadRequest
from voltage_ray.ingress.responses import refuse_hosted_tools
from voltage_ray.protocol.responses import CreateResponseRequest

BODY = {"model": "m", "input": "Hi", "tools": [{"type": "web_search"}, {"type": "mcp"}]}


def ingress(hosted_tools: str) -> object:
    """The app config's part the decision reads."""
    return SimpleNamespace(responses=ResponsesConfig.model_validate({"hosted_tools": hosted_tools}))


def test_hosted_tools_are_dropped_by_default_and_refused_when_configured() -> None:
    body = CreateResponseRequest.model_validate(BODY)
    refuse_hosted_tools(ingress("ignore"), body)  # type: ignore[arg-type]
    assert body.chat_tools() is None  # never offered to the model
    with pytest.raises(BadRequest) as refused:
        refuse_hosted_tools(ingress("refuse"), body)  # type: ignore[arg-type]
    assert "web_search, mcp are not supported" in refused.value.message
    assert refused.value.details["param"] == "tools"
