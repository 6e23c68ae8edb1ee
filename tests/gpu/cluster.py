"""What both GPU checks share: whether CUDA is here, the rehearsal switches, a local Ray that
offers the GPUs, and the wait for an app's /health."""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


ON_CPU = os.environ.get("VOLTAGE_GPU_CHECK_ON_CPU") == "1"
REQUIRE_CUDA = os.environ.get("VOLTAGE_GPU_CHECK_REQUIRE_CUDA") == "1"  # scripts/gpu_check
CUDA = _cuda_available()


def init_ray() -> None:
    """A local Ray with this host's GPUs (one logical GPU in a CPU rehearsal, so the replicas'
    GPU asks can be placed)."""
    import ray

    gpus = 1
    if CUDA:
        import torch

        gpus = torch.cuda.device_count()
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=gpus,
        object_store_memory=1 << 30,  # small: a VM's /dev/shm may be
        include_dashboard=False,
        log_to_driver=True,
    )
