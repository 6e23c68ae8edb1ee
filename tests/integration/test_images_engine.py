"""The diffusers backend on the real tiny-sd pipeline, without Ray: the built model is
deterministic, seeded images do not depend on their batch, and a job cancelled mid-call leaves the
batch at the next step without changing the images of the others."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import CACHE_DIR
from voltage_ray.backends.images import Bucket, ImageEngine, Job
from voltage_ray.backends.sources import materialize
from voltage_ray.backends.tiny import build_tiny_sd
from voltage_ray.config import BuiltinSource, ImageSettings

BUCKET = Bucket(256, 256, 10, 7.5)


class CancelAfter:
    """A cancel flag that turns on after it was read ``reads`` times (once per step and row)."""

    def __init__(self, reads: int) -> None:
        self.left = reads

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0

    def set(self) -> None:
        self.left = -1


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    location = materialize(BuiltinSource(builtin="tiny-sd"), CACHE_DIR)
    return ImageEngine(location, ImageSettings())


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_tiny_sd_builds_byte_identical(tmp_path: Path) -> None:
    digests = []
    for name in ("one", "two"):
        out = tmp_path / name
        out.mkdir()
        build_tiny_sd(out)
        digests.append(
            {
                str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(out.rglob("*"))
                if f.is_file()
            }
        )
    assert digests[0] == digests[1]
    assert {"model_index.json", "unet/config.json", "tokenizer/tokenizer.json"} <= set(digests[0])


def test_loads_as_a_stable_diffusion_pipeline(engine: ImageEngine) -> None:
    assert engine.info() == {
        "pipeline": "StableDiffusionPipeline",
        "scheduler": "DDIMScheduler",
        "device": "cpu",
        "drops_cancelled_rows": True,
    }


def test_images_are_noise_but_not_blank(engine: ImageEngine) -> None:
    ((data,),) = engine.run([Job("a fox", BUCKET, [1])])  # type: ignore[misc]
    image = pixels(data)
    assert image.shape == (256, 256, 3)
    assert image.std() > 5


def test_seeded_images_do_not_depend_on_their_batch(engine: ImageEngine) -> None:
    alone = engine.run([Job("a fox", BUCKET, [5, 6])])
    together = engine.run([Job("a car", BUCKET, [1]), Job("a fox", BUCKET, [5, 6])])
    assert together[1] == alone[0]
    assert alone[0] is not None and alone[0][0] != alone[0][1]


def test_a_job_cancelled_mid_call_leaves_at_the_next_step(engine: ImageEngine) -> None:
    leaving = Job("a fox", BUCKET, [5, 6], cancel=CancelAfter(2 * 3))  # type: ignore[arg-type]
    staying = Job("a car", BUCKET, [1])
    outcomes = engine.run([leaving, staying])
    assert outcomes[0] is None
    assert outcomes[1] == engine.run([Job("a car", BUCKET, [1])])[0]
    assert leaving.cancel.left < 0  # type: ignore[attr-defined]


def test_a_call_whose_jobs_all_left_stops(engine: ImageEngine) -> None:
    gone = Job("a fox", Bucket(1024, 1024, 150, 7.5), [1], cancel=CancelAfter(2))  # type: ignore[arg-type]
    assert engine.run([gone]) == [None]


def test_jpeg_output(engine: ImageEngine) -> None:
    ((data,),) = engine.run([Job("a fox", BUCKET, [1], output_format="jpeg")])  # type: ignore[misc]
    assert Image.open(io.BytesIO(data)).format == "JPEG"


async def test_server_settings_come_from_config_and_reconfigure() -> None:
    from voltage_ray.deployments.images import ImageServer

    model = {
        "id": "tiny-sd",
        "kind": "images",
        "source": {"builtin": "tiny-sd"},
        "images": {"max_batch_size": 5, "batch_wait_timeout_s": 0.2},
    }
    server = ImageServer(model, str(CACHE_DIR))
    stats = await server.stats()
    assert (stats["max_batch_size"], stats["batch_wait_timeout_s"]) == (5, 0.2)
    assert stats["max_pixels_per_call"] == ImageSettings().max_pixels_per_call
    server.reconfigure({"max_batch_size": 2, "max_pixels_per_call": 2 * 512 * 512})
    stats = await server.stats()
    assert (stats["max_batch_size"], stats["batch_wait_timeout_s"]) == (2, 0.2)
    assert stats["max_pixels_per_call"] == 2 * 512 * 512
    with pytest.raises(ValueError, match="dtype"):
        server.reconfigure({"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="scheduler"):
        server.reconfigure({"scheduler": "euler"})
    with pytest.raises(ValueError):
        server.reconfigure({"max_batch_size": 0})


def test_scheduler_override_keeps_dropping_cancelled_rows() -> None:
    location = materialize(BuiltinSource(builtin="tiny-sd"), CACHE_DIR)
    euler = ImageEngine(location, ImageSettings(scheduler="euler"))
    assert euler.info()["scheduler"] == "EulerDiscreteScheduler"
    assert euler.info()["drops_cancelled_rows"] is True
    leaving = Job("a fox", BUCKET, [5], cancel=CancelAfter(3))  # type: ignore[arg-type]
    outcomes = euler.run([leaving, Job("a car", BUCKET, [1])])
    assert outcomes[0] is None
    assert outcomes[1] == euler.run([Job("a car", BUCKET, [1])])[0]
