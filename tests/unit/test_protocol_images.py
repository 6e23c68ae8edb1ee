from __future__ import annotations

import json
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
        {"quality": "ultra"},  # OpenAI's fields keep OpenAI's values
        {"style": "vivid", "background": "transparent"},  # refused: this server cannot
        {"output_format": "jpeg"},
        {"output_compression": 50},
        {"partial_images": 2},
        {"stream": True},
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


def parse(fragment: str) -> dict[str, Any]:
    """A request body exactly as FastAPI hands it to pydantic: JSON parsed by ``json.loads``."""
    body: dict[str, Any] = {"prompt": "a fox"}
    body.update(json.loads("{" + fragment + "}"))
    return body


# One case per field per wrong JSON type; the expected error location names the field.
WRONG_TYPES = [
    ('"prompt": 5', "prompt"),
    ('"prompt": true', "prompt"),
    ('"prompt": null', "prompt"),
    ('"prompt": ["a fox"]', "prompt"),
    ('"n": 1.0', "n"),
    ('"n": "2"', "n"),
    ('"n": true', "n"),
    ('"size": 256', "size"),
    ('"size": true', "size"),
    ('"size": ["256x256"]', "size"),
    ('"response_format": 1', "response_format"),
    ('"response_format": true', "response_format"),
    ('"guidance_scale": true', "guidance_scale"),
    ('"guidance_scale": "7.5"', "guidance_scale"),
    ('"num_inference_steps": 50.0', "num_inference_steps"),
    ('"num_inference_steps": "50"', "num_inference_steps"),
    ('"num_inference_steps": true', "num_inference_steps"),
    ('"model": 1', "model"),
    ('"model": true', "model"),
    ('"seed": 1.5', "seed"),
    ('"seed": "1"', "seed"),
    ('"seed": true', "seed"),
    ('"user": 1', "user"),
    ('"user": false', "user"),
    ('"quality": 1', "quality"),
    ('"style": true', "style"),
    ('"moderation": "none"', "moderation"),
    ('"background": 0', "background"),
    ('"output_format": "gif"', "output_format"),
    ('"output_compression": "50"', "output_compression"),
    ('"partial_images": 1.0', "partial_images"),
    ('"stream": "no"', "stream"),
]


def test_openai_fields_that_ask_nothing_of_the_server_are_accepted() -> None:
    r = ImageGenerationRequest.model_validate(
        {
            "prompt": "p",
            "quality": "hd",
            "style": "natural",
            "moderation": "low",
            "background": "auto",
            "output_format": "png",
            "output_compression": 100,
            "partial_images": 0,
            "stream": False,
        }
    )
    assert r.quality == "hd" and r.stream is False


@pytest.mark.parametrize(("fragment", "field"), WRONG_TYPES)
def test_wrong_json_types_are_rejected(fragment: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate(parse(fragment))
    assert any(e["loc"][:1] == (field,) for e in info.value.errors()), info.value


def test_every_field_has_wrong_type_cases() -> None:
    assert {field for _, field in WRONG_TYPES} == set(ImageGenerationRequest.model_fields)


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("n", 1),
        ("size", "1024x1024"),
        ("response_format", "url"),
        ("guidance_scale", 7.5),
        ("num_inference_steps", 50),
        ("model", None),
        ("seed", None),
        ("user", None),
    ],
)
def test_null_means_the_default(field: str, default: object) -> None:
    r = ImageGenerationRequest.model_validate(parse(f'"{field}": null'))
    assert getattr(r, field) == default


def test_valid_json_types_pass_and_python_callers_still_work() -> None:
    r = ImageGenerationRequest.model_validate(
        parse('"n": 2, "size": "512x512", "guidance_scale": 7, "seed": 3, "model": "sd"')
    )
    assert r.guidance_scale == 7.0 and isinstance(r.guidance_scale, float)
    assert (r.n, r.size, r.seed, r.model) == (2, "512x512", 3, "sd")
    assert ImageGenerationRequest.model_validate(r) is r
    assert ImageGenerationRequest.model_validate(r.model_dump()) == r
