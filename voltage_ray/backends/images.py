"""Text-to-image with diffusers: compatible requests share one pipeline call.

A :class:`Job` is one request: its prompt, ``n`` and one seed per image, in a :class:`Bucket`
(size, steps, guidance). Jobs of one bucket can run as one pipeline call over all their prompts,
each image with its own ``torch.Generator``, so an image depends on its seed and prompt, not on
the jobs it shared the call with. :func:`take_group` picks the next call from a FIFO queue: the
oldest job and the later jobs of its bucket, so no job waits behind more calls than there are
jobs ahead of it. A job cancelled mid-call is dropped from the batch at the next denoising step
(or, for pipelines whose scheduler keeps per-row state, the call stops once every job in it is
cancelled).
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from voltage_ray.config import ImageSettings

logger = logging.getLogger(__name__)

OutputFormat = Literal["png", "jpeg"]
JPEG_QUALITY = 90
# Schedulers whose step keeps no state shaped by the batch, so rows may leave between steps;
# ImageSettings.scheduler may put one of them in place of a model's own.
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}
ROW_INDEPENDENT_SCHEDULERS = frozenset(SCHEDULERS.values())


@dataclass(frozen=True)
class Bucket:
    """What a pipeline call fixes for all its images."""

    width: int
    height: int
    steps: int
    guidance: float


@dataclass(eq=False)
class Job:
    """One request: ``len(seeds)`` images of ``prompt`` in ``bucket``."""

    prompt: str
    bucket: Bucket
    seeds: list[int]
    output_format: OutputFormat = "png"
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)  # arrival, for the queue wait

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def pixels(self) -> int:
        return self.n * self.bucket.width * self.bucket.height


def image_seeds(seed: int | None, n: int) -> list[int]:
    """Image i of a seeded request uses ``seed + i``; unseeded images get random seeds."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(n)]
    return [(seed + i) % 2**64 for i in range(n)]


def take_group(pending: Sequence[Job], max_pixels: int) -> list[Job]:
    """The jobs of the next pipeline call: the oldest live job, then later live jobs of its bucket
    in order while their pixels fit in ``max_pixels`` (the oldest goes even when it alone does
    not). Cancelled jobs are never taken."""
    live = [job for job in pending if not job.cancel.is_set()]
    if not live:
        return []
    head = live[0]
    group, pixels = [head], head.pixels
    for job in live[1:]:
        if job.bucket != head.bucket:
            continue
        if pixels + job.pixels > max_pixels:
            break
        group.append(job)
        pixels += job.pixels
    return group


def encode(image: Any, output_format: OutputFormat) -> bytes:
    """A PIL image as PNG or JPEG bytes."""
    buf = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


class Interrupted(Exception):
    """Every job of a running call was cancelled."""


class _StepGuard:
    """``callback_on_step_end``: after each step, drop the rows of cancelled jobs."""

    def __init__(self, jobs: Sequence[Job], shrink: bool) -> None:
        self.jobs = jobs
        self.rows = [j for j, job in enumerate(jobs) for _ in range(job.n)]  # row -> job
        self.shrink = shrink
        self.inputs = ["latents", "prompt_embeds"] if shrink else ["latents"]

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        keep = [r for r, j in enumerate(self.rows) if not self.jobs[j].cancel.is_set()]
        if not keep:
            raise Interrupted
        if len(keep) == len(self.rows) or not self.shrink:
            return {}
        index = torch.tensor(keep, device=tensors["latents"].device)
        embeds = tensors["prompt_embeds"]
        if pipe.do_classifier_free_guidance:  # the embeddings are [negative; positive]
            negative, positive = embeds.chunk(2)
            embeds = torch.cat([negative[index], positive[index]])
        else:
            embeds = embeds[index]
        self.rows = [self.rows[r] for r in keep]
        return {"latents": tensors["latents"][index], "prompt_embeds": embeds}


def embed_timestep_once(unet: Any) -> bool:
    """Make a Stable Diffusion UNet's time embedding one row, broadcast over the batch.

    The UNet expands the step's timestep to every row, then runs the time embedding's linear
    layers (and each resnet's ``time_emb_proj``) as matrix products with one row per image. CPU
    BLAS (MKL) picks its kernel by the number of rows (one, a few, blocks of four and their
    remainder), so the same row comes out differently, by an ulp, in batches of other sizes or
    at another place in its batch; over the denoising steps that grows into other pixels. Computed
    for one row, the embedding is the same for every batch, and the resnets add it by
    broadcasting. (Per-row added embeddings, as SDXL's, still make it a row per image.) Returns
    whether ``unet`` was changed: only a plain ``UNet2DConditionModel`` whose embedding is not
    concatenated with a per-row class embedding.
    """
    if type(unet).__name__ != "UNet2DConditionModel" or not hasattr(unet, "get_time_embed"):
        return False
    if getattr(unet.config, "class_embeddings_concat", False):
        return False
    per_row = unet.get_time_embed

    def once(sample: torch.Tensor, timestep: Any) -> Any:
        if torch.is_tensor(timestep) and timestep.numel() > 1:  # a timestep per row
            return per_row(sample=sample, timestep=timestep)
        return per_row(sample=sample[:1], timestep=timestep)

    unet.get_time_embed = once
    return True


class ImageEngine:
    """A diffusers text-to-image pipeline, loaded from a directory or hub id."""

    def __init__(self, location: str, settings: ImageSettings, device: str | None = None) -> None:
        from diffusers import AutoPipelineForText2Image

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "float16" if self.device.startswith("cuda") else "float32"
        self.pipe = AutoPipelineForText2Image.from_pretrained(location, dtype=getattr(torch, dtype))
        if settings.scheduler != "default":
            import diffusers

            replacement = getattr(diffusers, SCHEDULERS[settings.scheduler])
            self.pipe.scheduler = replacement.from_config(self.pipe.scheduler.config)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()  # decode one image at a time: big sizes x many images
        unet = getattr(self.pipe, "unet", None)
        if unet is not None:
            embed_timestep_once(unet)  # so an image's numbers do not depend on its batch
        unet_config = getattr(unet, "config", None)
        self.can_shrink = (
            type(self.pipe).__name__ == "StableDiffusionPipeline"
            and type(self.pipe.scheduler).__name__ in ROW_INDEPENDENT_SCHEDULERS
            and getattr(unet_config, "time_cond_proj_dim", None) is None
        )

    @staticmethod
    def set_threads(threads: int) -> None:
        """torch intra-op threads of the calling thread: call it from the thread that runs."""
        torch.set_num_threads(threads)

    def info(self) -> dict[str, Any]:
        return {
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
            "device": self.device,
            "drops_cancelled_rows": self.can_shrink,
        }

    def run(self, jobs: Sequence[Job]) -> list[list[bytes] | None]:
        """One pipeline call for jobs of one bucket; per job its images, None if cancelled.

        Blocking: call it from a worker thread.
        """
        bucket = jobs[0].bucket
        if any(job.bucket != bucket for job in jobs):
            raise ValueError("jobs of one pipeline call must share their bucket")
        guard = _StepGuard(jobs, self.can_shrink)
        try:
            output = self.pipe(
                prompt=[job.prompt for job in jobs for _ in range(job.n)],
                width=bucket.width,
                height=bucket.height,
                num_inference_steps=bucket.steps,
                guidance_scale=bucket.guidance,
                generator=[torch.Generator("cpu").manual_seed(s) for j in jobs for s in j.seeds],
                callback_on_step_end=guard,
                callback_on_step_end_tensor_inputs=guard.inputs,
                output_type="pil",
            )
        except Interrupted:
            return [None] * len(jobs)
        images: list[list[Any]] = [[] for _ in jobs]
        for j, image in zip(guard.rows, output.images, strict=True):
            images[j].append(image)
        return [
            None if job.cancel.is_set() else [encode(im, job.output_format) for im in images[j]]
            for j, job in enumerate(jobs)
        ]
