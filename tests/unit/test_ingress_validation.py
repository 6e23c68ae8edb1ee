"""Request bodies through the real FastAPI app (pure code: no Ray started).

The routers are the real ones; the served models are a stand-in whose lookup answers 404, so a
404 means the body passed validation and a 400 means it did not.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from voltage_ray.errors import NotFound
from voltage_ray.ingress import deps
from voltage_ray.ingress.api import create_api
from voltage_ray.metrics import IngressMetrics

CONFIG = SimpleNamespace(
    request_limits=SimpleNamespace(max_body_bytes=1 << 20),
    limits=SimpleNamespace(idempotency_max_mb=1),
)


class FakeModels:
    config = CONFIG

    def resolve(self, name: str, kind: str) -> Any:
        raise NotFound(f"validated: {kind}")

    def embedder(self, name: str) -> Any:
        raise NotFound("validated: embeddings")

    def default(self, kind: str) -> Any:
        raise NotFound(f"validated: {kind}")


@pytest.fixture(scope="module")
def app() -> FastAPI:
    api = create_api(
        CONFIG,  # type: ignore[arg-type]
        IngressMetrics(),
        auth=None,  # type: ignore[arg-type]
        served=FakeModels(),  # type: ignore[arg-type]
        admissions=None,  # type: ignore[arg-type]
    )

    async def anyone() -> None:
        return None

    api.dependency_overrides[deps.get_principal] = anyone
    return api


async def post(app: FastAPI, path: str, content: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.post(path, content=content, headers={"content-type": "application/json"})


CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], %s}'
EMBED = '{"model": "m", "input": "hi", %s}'
IMAGE = '{"prompt": "a fox", %s}'


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/v1/chat/completions", CHAT % '"frequency_penalty": false', "frequency_penalty"),
        ("/v1/chat/completions", CHAT % '"temperature": true', "temperature"),
        ("/v1/chat/completions", CHAT % '"max_tokens": "4"', "max_tokens"),
        ("/v1/chat/completions", CHAT % '"n": 1.0', "n"),
        ("/v1/chat/completions", CHAT % '"stream": "true"', "stream"),
        ("/v1/chat/completions", CHAT % '"model": null', "model"),
        (
            "/api/voltage/v1/chat/completions",
            '{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "messages.0.content",
        ),
        ("/v1/embeddings", EMBED % '"dimensions": 2.0', "dimensions"),
        ("/v1/embeddings", EMBED % '"encoding_format": 1', "encoding_format"),
        ("/v1/images/generations", IMAGE % '"n": "2"', "n"),
        ("/v1/images/generations", IMAGE % '"num_inference_steps": 50.0', "num_inference_steps"),
    ],
)
async def test_wrong_json_type_is_a_400_naming_the_field(
    app: FastAPI, path: str, body: str, loc: str
) -> None:
    r = await post(app, path, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["details"]["status"] == 400 and err["details"]["endpoint"] == path
    assert err["error"].startswith("Invalid request parameters: ") and loc in err["error"]
    assert any(e["loc"].startswith(loc) for e in err["details"]["errors"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT % '"temperature": 1, "top_p": 1, "presence_penalty": 0'),
        (
            "/v1/chat/completions",
            CHAT
            % (
                '"temperature": null, "top_p": null, "n": null, "stream": null, '
                '"max_tokens": null, "presence_penalty": null, "frequency_penalty": null, '
                '"stop": null, "stream_options": null, "seed": null, '
                '"max_completion_tokens": null, "user": null'
            ),
        ),
        ("/v1/embeddings", EMBED % '"encoding_format": null, "dimensions": null, "user": null'),
        (
            "/v1/images/generations",
            IMAGE
            % (
                '"n": null, "size": null, "response_format": null, "guidance_scale": 7, '
                '"num_inference_steps": null, "model": null, "seed": null, "user": null'
            ),
        ),
    ],
)
async def test_numbers_and_nulls_pass_validation(app: FastAPI, path: str, body: str) -> None:
    r = await post(app, path, body)
    assert r.status_code == 404, r.text  # past validation, at the stand-in's model lookup
    assert r.json()["error"].startswith("validated")
