"""`POST /images/generations` schemas: the spec's fields first, then the extensions."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from voltage_ray.protocol.common import RequestModel, ResponseModel, require_unicode

ImageSize = Literal["256x256", "512x512", "1024x1024", "1792x1024", "1024x1792"]
SIZES: tuple[str, ...] = ImageSize.__args__  # type: ignore[attr-defined]
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts up to this


class ImageGenerationRequest(RequestModel):
    """Spec `ImageGenerationRequest`."""

    # Its length limit is configurable: RequestLimits.images_max_prompt_chars (4000, as OpenAI's
    # dall-e-3; CLIP reads only the first 77 tokens anyway), checked by the route.
    prompt: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=10)
    size: ImageSize = "1024x1024"
    response_format: Literal["url", "b64_json"] = "url"
    guidance_scale: float = Field(default=7.5, ge=1, le=20)
    num_inference_steps: int = Field(default=50, ge=10, le=150)
    # Extension (OpenAI): the images model; default the first one configured.
    model: str | None = Field(default=None, min_length=1)
    # Extensions where the spec is silent: image i of a seeded request uses seed + i.
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = None
    # OpenAI's (dall-e-3 and the GPT image models), accepted and ignored: this model has one
    # quality and style, and no moderation.
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None
    # OpenAI's, refused unless they ask for what the server does anyway (REFUSED).
    background: Literal["transparent", "opaque", "auto"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    partial_images: int | None = Field(default=None, ge=0, le=3)
    stream: bool | None = None

    REFUSED: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "background": ("images are opaque PNGs", ("auto", "opaque")),
        "output_format": ("images are PNGs", ("png",)),
        "output_compression": ("images are lossless PNGs", (100,)),
        "partial_images": ("images are not streamed", (0,)),
        "stream": ("images are not streamed", (False,)),
    }

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        require_unicode(v, "prompt")
        return v

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])


class ImageData(ResponseModel):
    """One generated image: exactly one of `url` and `b64_json` (a PNG) is set."""

    url: str | None = None
    b64_json: str | None = None


class ImageGenerationResponse(ResponseModel):
    """Spec `ImageGenerationResponse`."""

    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
