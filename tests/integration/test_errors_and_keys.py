"""Every bad-input class gets a 4xx in the spec's shape; the key lifecycle works live."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest

from tests.integration.conftest import ServedApp

CHAT = "/v1/chat/completions"
OK_BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_spec_error(r, status: int, endpoint: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert body["details"]["status"] == status
    assert body["details"]["endpoint"] == endpoint
    return body


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4"},
        {"messages": OK_BODY["messages"]},
        {**OK_BODY, "temperature": 3},
        {**OK_BODY, "top_p": -1},
        {**OK_BODY, "n": 11},
        {**OK_BODY, "max_tokens": 0},
        {**OK_BODY, "presence_penalty": 9},
        {**OK_BODY, "stop": ["a", "b", "c", "d", "e"]},
        {**OK_BODY, "messages": [{"role": "wizard", "content": "x"}]},
        {**OK_BODY, "messages": [{"role": "user", "content": 5}]},
        {**OK_BODY, "messages": []},
        {**OK_BODY, "unknown_field": 1},
        {**OK_BODY, "stream": "yes please"},
        ["not", "an", "object"],
    ],
)
def test_invalid_parameters_are_400(served: ServedApp, body: object) -> None:
    with served.client() as c:
        r = c.post(CHAT, json=body, headers=served.headers())
    err = assert_spec_error(r, 400, CHAT)
    assert err["error"].startswith("Invalid request parameters")


def test_malformed_json_and_wrong_content_are_400(served: ServedApp) -> None:
    with served.client() as c:
        for raw in (b"{not json", b"", b'{"model": "gpt-4", "messages": [}'):
            r = c.post(
                CHAT, content=raw, headers={**served.headers(), "content-type": "application/json"}
            )
            assert_spec_error(r, 400, CHAT)


def test_unknown_model_is_404_naming_the_available_ones(served: ServedApp) -> None:
    with served.client() as c:
        r = c.post(CHAT, json={**OK_BODY, "model": "gpt-17"}, headers=served.headers())
    err = assert_spec_error(r, 404, CHAT)
    assert "gpt-17" in err["error"] and "tiny-chat" in err["error"]
    assert "gpt-4" in err["details"]["available_models"]


def test_unknown_route_and_wrong_method(served: ServedApp) -> None:
    with served.client() as c:
        assert_spec_error(
            c.get("/v1/nothing-here", headers=served.headers()), 404, "/v1/nothing-here"
        )
        assert_spec_error(c.get(CHAT, headers=served.headers()), 405, CHAT)
        assert_spec_error(
            c.delete("/api/voltage/v1/models", headers=served.headers()),
            405,
            "/api/voltage/v1/models",
        )


def test_missing_and_bad_keys_are_401(served: ServedApp) -> None:
    with served.client() as c:
        assert_spec_error(c.post(CHAT, json=OK_BODY), 401, CHAT)
        for key in ("nope", "vr_000000000000_wrong", served.key + "x"):
            assert_spec_error(
                c.post(CHAT, json=OK_BODY, headers={"X-VoltageGPU-Key": key}), 401, CHAT
            )
        r = c.post(CHAT, json=OK_BODY, headers={"Authorization": f"Bearer {served.key}"})
        assert r.status_code == 200
        assert_spec_error(c.get("/v1/models"), 401, "/v1/models")


def test_sdk_raises_typed_errors(served: ServedApp) -> None:
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=OK_BODY["messages"])
    bad = openai.OpenAI(base_url=served.base_url + "/v1", api_key="vr_x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_models_and_health(served: ServedApp) -> None:
    client = openai.OpenAI(base_url=served.base_url + "/api/voltage/v1", api_key=served.key)
    ids = {m.id for m in client.models.list()}
    assert {"tiny-chat", "gpt-4"} <= ids
    assert client.models.retrieve("gpt-4").root == "tiny-chat"  # type: ignore[attr-defined]
    with served.client() as c:
        for path in ("/health", "/v1/health", "/api/voltage/v1/health"):
            r = c.get(path)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        assert c.get("/openapi.json").status_code == 200


def cli(served: ServedApp, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "voltage_ray.cli",
            "--db",
            str(served.db),
            "--plans",
            str(served.plans),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_status(served: ServedApp, key: str, status: int, within: float = 5.0) -> float:
    start = time.monotonic()
    with served.client() as c:
        while True:
            r = c.get("/v1/models", headers=served.headers(key))
            if r.status_code == status:
                return time.monotonic() - start
            assert time.monotonic() - start < within, f"still {r.status_code} after {within}s"
            time.sleep(0.1)


def test_key_lifecycle_through_the_cli_while_serving(served: ServedApp) -> None:
    made = cli(served, "keys", "create", "--plan", "test", "--name", "lifecycle")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("vr_")
    assert wait_status(served, key, 200) < 5.0

    listed = cli(served, "keys", "list")
    assert "lifecycle" in listed.stdout and key not in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout

    revoked = cli(served, "keys", "revoke", key)
    assert revoked.returncode == 0, revoked.stderr
    assert wait_status(served, key, 401) < 5.0

    unknown = cli(served, "keys", "create", "--plan", "platinum")
    assert unknown.returncode != 0 and "unknown plan" in unknown.stderr
