from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from voltage_ray.protocol.images import (
    SIZES,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
)


def test_defaults_follow_the_spec() -> None:
    r = ImageGenerationRequest(prompt="a fox")
    assert (r.n, r.size, r.response_format) == (1, "1024x1024", "url")
    assert (r.guidance_scale, r.num_inference_steps) == (7.5, 50)
    assert (r.model, r.seed, r.user) == (None, None, None)


def test_sizes_are_the_spec_enum() -> None:
    assert SIZES == ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")
    r = ImageGenerationRequest(prompt="p", size="1792x1024")
    assert (r.width, r.height) == (1792, 1024)
    r = ImageGenerationRequest(prompt="p", size="1024x1792")
    assert (r.width, r.height) == (1024, 1792)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1, "guidance_scale": 1, "num_inference_steps": 10},
        {"n": 10, "guidance_scale": 20, "num_inference_steps": 150},
        {"response_format": "b64_json", "seed": 0, "user": "u", "model": "dall-e-3"},
        {"seed": 2**64 - 1},
    ],
)
def test_bounds_are_inclusive(fields: dict[str, Any]) -> None:
    ImageGenerationRequest.model_validate({"prompt": "p", **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ""},
        {"prompt": "a\ud800b"},
        {"n": 0},
        {"n": 11},
        {"n": 2.5},
        {"size": "1024x768"},
        {"size": "256X256"},
        {"response_format": "png"},
        {"guidance_scale": 0.99},
        {"guidance_scale": 20.01},
        {"num_inference_steps": 9},
        {"num_inference_steps": 151},
        {"seed": -1},
        {"seed": 2**64},
        {"model": ""},
        {"quality": "hd"},  # OpenAI's dall-e-3 field is not part of this API
        {"style": "vivid"},
    ],
)
def test_out_of_contract_values_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"prompt": "p", **fields})


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"n": 1})


def test_response_has_one_field_per_image() -> None:
    body = ImageGenerationResponse(
        created=1,
        data=[ImageData(url="http://h/v1/images/files/x.png"), ImageData(b64_json="QQ==")],
    ).model_dump(exclude_none=True)
    assert body == {
        "created": 1,
        "data": [{"url": "http://h/v1/images/files/x.png"}, {"b64_json": "QQ=="}],
    }
