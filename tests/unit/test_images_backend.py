"""The pure parts of the diffusers backend: seeds, grouping, dropping rows, encoding."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from voltage_ray.backends.images import (
    Bucket,
    Interrupted,
    Job,
    _StepGuard,
    encode,
    image_seeds,
    take_group,
)

SMALL = Bucket(256, 256, 10, 7.5)
LARGE = Bucket(1024, 1024, 10, 7.5)
OTHER_STEPS = Bucket(256, 256, 20, 7.5)
OTHER_GUIDANCE = Bucket(256, 256, 10, 1.0)


def job(bucket: Bucket = SMALL, n: int = 1, prompt: str = "p") -> Job:
    return Job(prompt, bucket, list(range(n)))


def test_seeds() -> None:
    assert image_seeds(7, 3) == [7, 8, 9]
    assert image_seeds(2**64 - 1, 2) == [2**64 - 1, 0]
    random = image_seeds(None, 10)
    assert len(set(random)) == 10 and all(0 <= s < 2**63 for s in random)


def test_group_takes_the_oldest_and_its_bucket() -> None:
    a1, b1, a2, c1, a3 = job(), job(LARGE), job(), job(OTHER_STEPS), job()
    assert take_group([a1, b1, a2, c1, a3], max_pixels=10**9) == [a1, a2, a3]
    assert take_group([b1, a2, c1, a3], max_pixels=10**9) == [b1]
    assert take_group([c1, a3], max_pixels=10**9) == [c1]
    assert take_group([], max_pixels=10**9) == []


def test_steps_and_guidance_are_part_of_the_bucket() -> None:
    a, b, c = job(), job(OTHER_STEPS), job(OTHER_GUIDANCE)
    assert take_group([a, b, c], 10**9) == [a]
    assert take_group([b, c], 10**9) == [b]


def test_group_respects_the_pixel_cap_in_order() -> None:
    per_image = 256 * 256
    jobs = [job(n=2), job(n=3), job(n=1), job(n=1)]
    # 2 + 3 fit in 5 images; the third (1 more) would not: the group stops there, in order.
    assert take_group(jobs, max_pixels=5 * per_image) == jobs[:2]
    assert take_group(jobs, max_pixels=7 * per_image) == jobs


def test_the_oldest_goes_even_when_it_alone_is_over_the_cap() -> None:
    big, small = job(LARGE, n=10), job(LARGE)
    assert take_group([big, small], max_pixels=1) == [big]


def test_cancelled_jobs_are_never_taken() -> None:
    a, b, c = job(), job(LARGE), job()
    a.cancel.set()
    assert take_group([a, b, c], 10**9) == [b]
    b.cancel.set()
    assert take_group([a, b, c], 10**9) == [c]
    c.cancel.set()
    assert take_group([a, b, c], 10**9) == []


def test_no_starvation_under_a_stream_of_one_bucket() -> None:
    """Each call serves the oldest job: a lone job of another bucket runs once it is oldest."""
    pending = [job(prompt="a0"), job(LARGE, prompt="lonely")]
    served: list[list[str]] = []
    for i in range(1, 4):
        group = take_group(pending, 10**9)
        served.append([j.prompt for j in group])
        pending = [j for j in pending if j not in group] + [job(prompt=f"a{i}")]
    assert served == [["a0"], ["lonely"], ["a1", "a2"]]


def tensors(rows: int) -> dict[str, torch.Tensor]:
    latents = torch.arange(rows, dtype=torch.float32).reshape(rows, 1)
    positive = torch.arange(rows, dtype=torch.float32).reshape(rows, 1) + 100
    negative = -positive
    return {"latents": latents, "prompt_embeds": torch.cat([negative, positive])}


def test_guard_drops_the_rows_of_cancelled_jobs() -> None:
    a, b, c = job(n=2), job(n=1), job(n=2)  # rows 0-1, 2, 3-4
    guard = _StepGuard([a, b, c], shrink=True)
    pipe = SimpleNamespace(do_classifier_free_guidance=True)
    assert guard.inputs == ["latents", "prompt_embeds"]
    assert guard(pipe, 0, 999, tensors(5)) == {}
    a.cancel.set()
    out = guard(pipe, 1, 998, tensors(5))
    assert out["latents"].flatten().tolist() == [2, 3, 4]
    assert out["prompt_embeds"].flatten().tolist() == [-102, -103, -104, 102, 103, 104]
    assert guard.rows == [1, 2, 2]
    c.cancel.set()
    out = guard(pipe, 2, 997, tensors(3))
    assert out["latents"].flatten().tolist() == [0]  # row 0 of the shrunk batch is b's
    assert guard.rows == [1]
    b.cancel.set()
    with pytest.raises(Interrupted):
        guard(pipe, 3, 996, tensors(1))


def test_guard_without_guidance_has_one_embedding_per_row() -> None:
    a, b = job(), job()
    guard = _StepGuard([a, b], shrink=True)
    a.cancel.set()
    t = tensors(2)
    t["prompt_embeds"] = t["prompt_embeds"][2:]  # positive only
    out = guard(SimpleNamespace(do_classifier_free_guidance=False), 0, 1, t)
    assert out["prompt_embeds"].flatten().tolist() == [101]


def test_guard_that_cannot_shrink_runs_on_until_all_left() -> None:
    a, b = job(), job()
    guard = _StepGuard([a, b], shrink=False)
    assert guard.inputs == ["latents"]
    a.cancel.set()
    assert guard(SimpleNamespace(), 0, 1, tensors(2)) == {}
    assert guard.rows == [0, 1]
    b.cancel.set()
    with pytest.raises(Interrupted):
        guard(SimpleNamespace(), 1, 1, tensors(2))


@pytest.mark.parametrize(("fmt", "name"), [("png", "PNG"), ("jpeg", "JPEG")])
def test_encode(fmt: str, name: str) -> None:
    image = Image.new("RGB", (32, 16), (10, 200, 30))
    decoded = Image.open(io.BytesIO(encode(image, fmt)))  # type: ignore[arg-type]
    assert decoded.format == name and decoded.size == (32, 16)
