"""voltage_ray's sampler against the libraries' own, per row and token, one run, one thread.

    .venv/bin/python benchmarks/sampler.py [--tokens 256]

The logits are real: SmolLM2-135M-Instruct (the default chat model, 49,152 tokens) answering a
prompt greedily through llama.cpp (``backends/llama_cpp.py``), one row per generated token.
Each sampler then picks a token for every row in turn, keeping its own state (penalty counts,
generator), with:

- greedy: temperature 0;
- sampled: temperature 0.8, top_p 0.9, presence and frequency penalties 0.3 (the sampled load
  of ``benchmarks/chat_engines.py``).

Samplers:

- voltage_ray: ``backends/sampler.py``, the one sampler of every CPU engine (per-row
  parameters in a continuous batch; see its docstring for why the libraries' do not serve);
- llama.cpp: its C sampler chain as llama-server builds it per slot with its defaults for the
  fields a request leaves unset (penalties over the last 64 tokens, top_k 40, top_p, min_p 0.05,
  temperature, dist; greedy: the greedy sampler), on a token-data array filled from the logits
  each step as ``common_sampler`` does, through llama-cpp-python;
- transformers: ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``, then softmax and
  ``torch.multinomial`` (transformers has no OpenAI presence/frequency penalties: none applied,
  which flatters it).

Per sampler: the median and p90 microseconds per token, and ours / theirs. For scale, the run
also prints llama.cpp's forward pass per token on this model and thread count (the sampler's
share of a decode step is what it costs streams).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.chat import CACHE, SAMPLED, SOURCE  # the chat benchmarks' model and load

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def real_logits(tokens: int) -> tuple[np.ndarray, float]:
    """Logits of ``tokens`` greedy steps of SmolLM2 on PROMPT, and the forward pass' median
    seconds per token (one thread)."""
    from transformers import AutoTokenizer

    from voltage_ray.backends.llama_cpp import Chunk, LlamaCppModel
    from voltage_ray.backends.sources import gguf_file, materialize_tokenizer
    from voltage_ray.config import GGUFSource

    source = GGUFSource(**SOURCE)
    tok = AutoTokenizer.from_pretrained(materialize_tokenizer(source, Path(CACHE)))
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode(text, add_special_tokens=False)
    model = LlamaCppModel(str(gguf_file(source)), n_ctx_per_seq=2048, n_seq_max=1, n_threads=1)
    rows, steps = [], []
    out = model.forward([Chunk(0, ids, 0, True)])
    pos = len(ids)
    for _ in range(tokens):
        rows.append(out[0].copy())
        token = int(out[0].argmax())
        start = time.perf_counter()
        out = model.forward([Chunk(0, [token], pos, True)])
        steps.append(time.perf_counter() - start)
        pos += 1
    model.close()
    return np.stack(rows), statistics.median(steps)


def ours(greedy: bool, vocab: int) -> Callable[[np.ndarray], int]:
    from voltage_ray.backends.chat import Prepared
    from voltage_ray.backends.sampler import row_sampling, sample

    params = {"temperature": 0.0} if greedy else SAMPLED
    request = Prepared(
        **{
            "input_ids": [1],
            "max_tokens": 1 << 20,
            "n": 1,
            "top_p": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop": [],
            "seed": 1,
            **params,
        }
    )
    row = row_sampling(request, 0, None)

    def pick(logits: np.ndarray) -> int:
        return sample(torch.from_numpy(logits[None]), [row])[0][0]

    return pick


def llama_cpp(greedy: bool, vocab: int) -> Callable[[np.ndarray], int]:
    import llama_cpp as lib
    from llama_cpp._internals import LlamaTokenDataArray

    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if greedy:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    else:  # llama-server's default chain and values for the fields a request leaves unset
        present, freq = SAMPLED["presence_penalty"], SAMPLED["frequency_penalty"]
        for sampler in (
            lib.llama_sampler_init_penalties(vocab, 64, 1.0, freq, present),  # last 64 tokens
            lib.llama_sampler_init_top_k(40),
            lib.llama_sampler_init_top_p(SAMPLED["top_p"], 1),
            lib.llama_sampler_init_min_p(0.05, 1),
            lib.llama_sampler_init_temp(SAMPLED["temperature"]),
            lib.llama_sampler_init_dist(1),
        ):
            lib.llama_sampler_chain_add(chain, sampler)
    cur = LlamaTokenDataArray(n_vocab=vocab)

    def pick(logits: np.ndarray) -> int:
        cur.copy_logits(logits)
        lib.llama_sampler_apply(chain, ctypes.byref(cur.candidates))
        token = int(cur.candidates_data.id[cur.candidates.selected])
        lib.llama_sampler_accept(chain, token)
        return token

    return pick


def transformers_warpers(greedy: bool, vocab: int) -> Callable[[np.ndarray], int]:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(SAMPLED["temperature"]), TopPLogitsWarper(SAMPLED["top_p"])]
    )
    generator = torch.Generator().manual_seed(1)
    fed = torch.zeros((1, 0), dtype=torch.long)

    def pick(logits: np.ndarray) -> int:
        scores = torch.from_numpy(logits[None])
        if greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(warpers(fed, scores), dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick


def filling(rows: np.ndarray) -> float:
    """Median seconds to fill llama.cpp's token-data array from a row of logits."""
    from llama_cpp._internals import LlamaTokenDataArray

    cur = LlamaTokenDataArray(n_vocab=rows.shape[1])
    times = []
    for row in rows:
        start = time.perf_counter()
        cur.copy_logits(row)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SAMPLERS = {"voltage_ray": ours, "llama.cpp": llama_cpp, "transformers": transformers_warpers}


def per_token(
    make: Callable[[bool, int], Callable[[np.ndarray], int]], rows: np.ndarray, greedy: bool
) -> tuple[float, float]:
    pick = make(greedy, rows.shape[1])
    for row in rows[:16]:  # warm-up
        pick(row)
    pick = make(greedy, rows.shape[1])  # fresh state for the timed pass
    times = []
    for row in rows:
        start = time.perf_counter()
        pick(row)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=256, help="rows of real logits")
    a = p.parse_args()
    torch.set_num_threads(1)  # as in the llama.cpp engine's replica
    rows, forward = real_logits(a.tokens)
    print(
        f"== samplers on {len(rows)} rows of SmolLM2 logits ({rows.shape[1]} tokens), one thread;"
        f" llama.cpp's forward pass: {forward * 1e3:.2f} ms/token"
    )
    fill = filling(rows)
    print(
        f"  (llama.cpp's rows below include {fill * 1e6:.1f} us/token of filling its token-data"
        " array from NumPy; llama-server fills it in a C++ loop)"
    )
    for mode in ("greedy", "sampled"):
        figures = {name: per_token(make, rows, mode == "greedy") for name, make in SAMPLERS.items()}
        mine = figures["voltage_ray"][0]
        for name, (median, p90) in figures.items():
            share = f"{median / forward:6.1%} of a forward pass"
            vs = "" if name == "voltage_ray" else f"  ours / this {mine / median:5.2f}x"
            print(
                f"  {mode:8s} {name:13s} {median * 1e6:7.1f} us/token (p90 {p90 * 1e6:7.1f})"
                f"  {share}{vs}"
            )


if __name__ == "__main__":
    main()
