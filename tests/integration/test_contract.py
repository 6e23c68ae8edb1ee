"""Property-based contract tests: schemathesis drives the spec file itself against the service.

Every operation of ../shared/spec/voltagegpu-openapi.yaml gets its explicit examples and
generated bodies (valid and invalid). Whatever arrives: no 5xx, every non-2xx in the spec's error
shape, every declared response (2xx and errors) matching the spec's schema and content type.
Image requests keep every field but are made cheap: valid step counts become 10 and n at most 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, response_schema_conformance

from tests.integration.conftest import REPO, ServedApp

SPEC = Path(
    os.environ.get("VOLTAGE_SPEC", REPO.parent / "shared" / "spec" / "voltagegpu-openapi.yaml")
)
EXAMPLES = int(os.environ.get("VOLTAGE_CONTRACT_EXAMPLES", "40"))
schema = schemathesis.openapi.from_path(str(SPEC))


def cheap(body: Any) -> Any:
    """Keep an image request's fields, but make valid costly values cheap."""
    if isinstance(body, dict):
        steps = body.get("num_inference_steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and 10 <= steps <= 150:
            body["num_inference_steps"] = 10
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10:
            body["n"] = min(n, 2)
    return body


def assert_error_shape(response: Any, case: Any) -> None:
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    details = body.get("details")
    assert isinstance(details, dict), body
    assert details.get("status") == response.status_code, body
    assert details.get("endpoint") == "/v1" + case.path, body


@pytest.mark.parametrize("path", ["/chat/completions", "/embeddings", "/images/generations"])
def test_spec_contract(served: ServedApp, path: str) -> None:
    operation = schema[path]["POST"]
    strategy = st.one_of(operation.as_strategy(), *operation.get_strategies_from_examples())
    statuses: set[int] = set()

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: Any) -> None:
        if path == "/images/generations":
            case.body = cheap(case.body)
        response = case.call(
            base_url=served.base_url + "/v1", headers=served.headers(), timeout=300
        )
        statuses.add(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 300:
            assert_error_shape(response, case)
        content_type = response.headers.get("content-type") or [""]
        if isinstance(content_type, list):  # schemathesis keeps every value of a header
            content_type = content_type[0]
        if content_type.startswith("text/event-stream"):
            # The spec types an SSE body as a plain string: check the framing here instead.
            frames = [f for f in response.text.split("\n\n") if f]
            assert frames[-1] == "data: [DONE]", frames[-3:]
            assert all(f.startswith("data: {") for f in frames[:-1])
            case.validate_response(response, checks=[content_type_conformance])
            return
        case.validate_response(
            response, checks=[response_schema_conformance, content_type_conformance]
        )

    check()
    # The explicit examples are valid requests: the success path was exercised, not only 4xx.
    assert 200 in statuses, statuses
    assert any(400 <= s < 500 for s in statuses), statuses
