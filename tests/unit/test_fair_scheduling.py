"""Fair scheduling between API keys in the chat engines, in process, on both CPU engines
(transformers on the tiny model, llama.cpp on SmolLM2's GGUF): a key under its share starts at
once (a headroom row, or a paused row of the key holding the most), paused rows resume with the
very text they would have produced, priorities go first, and a full queue sheds the heaviest key's
newest request instead of refusing a key under its share."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.unit.test_batching import CACHE, SMOL_GGUF, drain, request
from voltage_ray.backends.chat import Finished, Prepared
from voltage_ray.backends.engines import SchedulerBackend, TransformersBackend
from voltage_ray.backends.fairness import Tenant
from voltage_ray.backends.llama_cpp import llama_cpp_unavailable
from voltage_ray.backends.sources import gguf_file, materialize, materialize_tokenizer
from voltage_ray.config import BuiltinSource, ChatSettings
from voltage_ray.errors import BadRequest, Overloaded

H, L, PAID = Tenant("heavy"), Tenant("light"), Tenant("paid", priority=1)
Make = Callable[..., SchedulerBackend]


@pytest.fixture(params=["transformers", "llama_cpp"])
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    """Builds an engine with 2 rows and the given settings; shuts every one down after."""
    made: list[SchedulerBackend] = []

    def build(max_queued: int | None = None, **settings: Any) -> SchedulerBackend:
        s = ChatSettings(
            max_context=512, max_num_seqs=2, max_prefill_tokens=64, dtype="float32", **settings
        )
        b: SchedulerBackend
        if request.param == "transformers":
            location = materialize(BuiltinSource(builtin="tiny-llama"), CACHE)
            b = TransformersBackend(location, s, max_queued=max_queued)
        else:
            reason = llama_cpp_unavailable()
            if reason is not None:
                pytest.skip(reason)
            from voltage_ray.backends.llama_cpp_engine import LlamaCppBackend

            tokenizer = materialize_tokenizer(SMOL_GGUF, CACHE)
            b = LlamaCppBackend(str(gguf_file(SMOL_GGUF)), tokenizer, s, 2, max_queued=max_queued)
        made.append(b)
        return b

    yield build
    for b in made:
        b.shutdown()


def long(backend: SchedulerBackend, i: int, max_tokens: int = 40, **kw: Any) -> Prepared:
    """A long answer: greedy, or seeded sampling (its generator must survive a pause)."""
    prompt = f"Tell me a long story about fox number {i}."
    return request(backend, prompt, max_tokens=max_tokens, **kw)


def submit(backend: SchedulerBackend, job: Prepared, tenant: Tenant) -> queue.Queue[Any]:
    sink: queue.Queue[Any] = queue.Queue()
    backend.scheduler.submit(job, sink.put, tenant)
    return sink


def started(sink: queue.Queue[Any]) -> list[Any]:
    """Wait for a request's first item (it holds a row): the items so far."""
    return [sink.get(timeout=60)]


def text_of(items: list[Any], sink: queue.Queue[Any], n: int = 1) -> str:
    """A request's whole text: the items already read, then the rest up to Finished."""
    pre = "".join(ev.text for item in items for ev in item)
    return pre + drain(sink, n)[0][0]


def alone(make: Make, jobs: list[Prepared]) -> list[str]:
    """Each job's text when it runs by itself, never paused."""
    b = make(headroom_rows=0)
    return [text_of([], submit(b, job, H)) for job in jobs]


def test_a_paused_row_resumes_with_exactly_the_text_it_would_have_produced(make: Make) -> None:
    b = make(headroom_rows=0)
    jobs = [long(b, 0, temperature=0), long(b, 1, temperature=0.9, seed=7)]
    expected = alone(make, jobs)
    heavy = [submit(b, job, H) for job in jobs]
    firsts = [started(s) for s in heavy]  # both rows are heavy's
    light = submit(b, request(b, "Hi", max_tokens=3, temperature=0), L)
    assert not isinstance(light.get(timeout=60), BaseException)  # it started at once
    drain(light, 1)
    assert [text_of(f, s) for f, s in zip(firsts, heavy, strict=True)] == expected
    stats = b.scheduler.stats()
    assert stats["preemptions"] >= 1 and stats["resumptions"] == stats["preemptions"]
    assert stats["paused"] == 0 and stats["running"] == 0


def test_a_key_under_its_share_takes_a_headroom_row_without_pausing_anyone(make: Make) -> None:
    b = make(headroom_rows=1)
    heavy = [submit(b, long(b, i, temperature=0), H) for i in range(3)]
    firsts = [started(s) for s in heavy[:2]]
    light = submit(b, request(b, "Hi", max_tokens=3, temperature=0), L)
    assert not isinstance(light.get(timeout=60), BaseException)
    assert heavy[2].empty()  # heavy's third waits: the headroom row is not for the key at its share
    drain(light, 1)
    for f, s in zip(firsts, heavy, strict=False):
        text_of(f, s)
    text_of([], heavy[2])
    stats = b.scheduler.stats()
    assert stats["preemptions"] == 0 and max(stats["batch_sizes"]) == 3


def test_the_next_free_row_goes_to_the_key_holding_fewest_not_the_oldest(make: Make) -> None:
    b = make(headroom_rows=0)
    first_heavy = [submit(b, long(b, i, temperature=0, max_tokens=8), H) for i in range(2)]
    backlog = [submit(b, long(b, i, temperature=0, max_tokens=8), H) for i in range(2, 5)]
    for s in first_heavy:
        started(s)
    # Two keys of equal claim: the one holding fewer rows is taken before heavy's older ones.
    middle = submit(b, request(b, "Hi", max_tokens=3, temperature=0), Tenant("middle"))
    assert not isinstance(middle.get(timeout=60), BaseException)
    assert all(s.empty() for s in backlog)  # heavy's backlog still waits
    drain(middle, 1)
    for s in [*first_heavy, *backlog]:
        drain(s, 1)


def test_a_higher_priority_request_pauses_a_lower_one_past_its_share(make: Make) -> None:
    b = make(headroom_rows=0)
    low = [submit(b, long(b, i, temperature=0), Tenant(f"free{i}")) for i in range(2)]
    firsts = [started(s) for s in low]  # one row each: fair between them, no share exceeded
    paid = submit(b, request(b, "Hi", max_tokens=3, temperature=0), PAID)
    assert not isinstance(paid.get(timeout=60), BaseException)
    drain(paid, 1)
    for f, s in zip(firsts, low, strict=True):
        text_of(f, s)
    assert b.scheduler.stats()["preemptions"] == 1


def test_a_full_queue_sheds_the_heaviest_keys_newest_request_never_a_key_under_its_share(
    make: Make,
) -> None:
    b = make(headroom_rows=0, max_queued=2)
    running = [submit(b, long(b, i, temperature=0), H) for i in range(2)]
    for s in running:
        started(s)
    waiting = [submit(b, long(b, i, temperature=0), H) for i in range(2, 4)]  # the queue is full
    with pytest.raises(Overloaded) as refused:
        b.scheduler.submit(long(b, 9), lambda item: None, H)  # heavy holds its share: refused
    assert refused.value.details["reason"] == "refused"
    light = submit(b, request(b, "Hi", max_tokens=3, temperature=0), L)
    shed = waiting[1].get(timeout=60)  # heavy's newest gave way
    assert isinstance(shed, Overloaded) and shed.details["reason"] == "shed"
    drain(light, 1)
    for s in [*running, waiting[0]]:
        drain(s, 1)
    stats = b.scheduler.stats()
    assert stats["shed"] == 1 and stats["refused"] == 1
    assert b.scheduler.places == {}  # every place was given back


def test_a_cancelled_paused_row_is_dropped_and_its_place_given_back(make: Make) -> None:
    b = make(headroom_rows=0)
    heavy: list[queue.Queue[Any]] = [queue.Queue() for _ in range(2)]
    tickets = [
        b.scheduler.submit(long(b, i, temperature=0, max_tokens=200), s.put, H)
        for i, s in enumerate(heavy)
    ]
    for s in heavy:
        started(s)
    light = submit(b, request(b, "Hi", max_tokens=30, temperature=0), L)
    light.get(timeout=60)
    paused = [t for t in tickets if any(r.ticket is t for r in b.scheduler.paused)]
    assert len(paused) == 1
    b.scheduler.cancel(paused[0])
    drain(light, 1)
    for s, t in zip(heavy, tickets, strict=True):
        if t is not paused[0]:
            drain(s, 1)
    stats = b.scheduler.stats()
    assert stats["paused"] == 0 and stats["evicted_cancelled"] == 1
    assert b.scheduler.places == {}
    assert not any(
        isinstance(item, Finished) for item in list(heavy[tickets.index(paused[0])].queue)
    )


def test_a_constraint_that_gives_up_mid_way_fails_its_request_alone(make: Make) -> None:
    """llguidance builds a regex's lexer lazily: a megabyte regex compiles, then exceeds the
    lexer's limits at the first token. That request gets a 400; the one beside it finishes."""
    backend = make()
    huge = request(
        backend, "Say x", max_tokens=4, n=2, structured_outputs={"regex": "x" * (1 << 20)}
    )
    fine = long(backend, 1, max_tokens=6)
    bad_sink, good_sink = submit(backend, huge, L), submit(backend, fine, H)
    failure = bad_sink.get(timeout=60)
    assert isinstance(failure, BadRequest), failure
    assert "structured_outputs.regex cannot be enforced" in str(failure)
    assert failure.details["param"] == "structured_outputs.regex"
    text, done = drain(good_sink, 1)
    assert text[0] and 0 < done.tokens[0] <= 6
    for _ in range(100):  # the failed request's rows are evicted and its place is free
        if not backend.scheduler.places:
            break
        time.sleep(0.05)
    assert not backend.scheduler.places
    assert bad_sink.empty()  # nothing after the error
