"""The limiter class without Ray: atomic admission, settlement, durable group commit (every
answer on disk before it is given), restart recovery of every outstanding hold.

The actor is an ordinary class; Ray adds only the remote calls. These tests drive it on one
event loop, as the actor's loop does, with many admissions in flight at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import ray

from voltage_ray.errors import BadRequest, Forbidden, QuotaExceeded, RateLimited, Unauthorized
from voltage_ray.limits import limiter as limiter_mod
from voltage_ray.limits.db import Database
from voltage_ray.limits.idempotency import Answer, Answers, InProgress, Replay, valid_key
from voltage_ray.limits.keys import KeyStore, parse_key
from voltage_ray.limits.limiter import Grant, Limiter, Settlement

PLANS = """\
plans:
  five: {requests_per_minute: 5}
  tiny: {tokens_per_month: 100, images_per_month: 2}
  open: {}
"""


@pytest.fixture()
def env(tmp_path: Path, database: str) -> tuple[str, Path]:
    """The database (SQLite and PostgreSQL, one test each) and the plans."""
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    return database, plans


def new_key(db: str | Path, plan: str) -> tuple[str, str]:
    store = KeyStore(db)
    try:
        record, key = store.create(plan)
        return record.id, key
    finally:
        store.close()


def settlement(g: Grant, tokens: int = 0, images: int = 0) -> Settlement:
    return Settlement(g.ticket, g.epoch, g.key_id, g.period, g.tokens, g.images, tokens, images)


def query(db: str, sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql`` on the database, numbers as ints."""
    conn = Database(db)
    try:
        rows = conn.all(sql)
    finally:
        conn.close()
    return [tuple(int(v) if isinstance(v, int) else v for v in row) for row in rows]


def held(db: str) -> list[tuple[str, int, str, int]]:
    """The outstanding holds on disk: (epoch, ticket, key id, tokens)."""
    conn = Database(db)
    try:
        rows = conn.all("SELECT epoch, ticket, key_id, tokens FROM holds")
    finally:
        conn.close()
    return sorted((str(e), int(t), str(k), int(n)) for e, t, k, n in rows)


def stored(db: str, key_id: str) -> tuple[int, ...] | None:
    conn = Database(db)
    try:
        row = conn.one(
            "SELECT requests, tokens, images, reserved_tokens FROM usage WHERE key_id = ?",
            (key_id,),
        )
    finally:
        conn.close()
    return tuple(int(v) for v in row) if row else None


async def test_forty_simultaneous_admissions_on_five_per_minute(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "five")
    lim = Limiter(db, str(plans))
    results = await asyncio.gather(*(lim.admit(key_id, (), 0, 0) for _ in range(40)))
    grants = [r for r in results if isinstance(r, Grant)]
    refusals = [r for r in results if isinstance(r, RateLimited)]
    assert len(grants) == 5 and len(refusals) == 35
    assert refusals[0].details["retry_after"] == 60
    assert refusals[0].headers["Retry-After"] == "60"
    assert refusals[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert sorted(g.headers["x-ratelimit-remaining-requests"] for g in grants) == list("01234")


async def test_token_quota_is_never_exceeded(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans))
    results = await asyncio.gather(*(lim.admit(key_id, (), 30, 0) for _ in range(30)))
    grants = [r for r in results if isinstance(r, Grant)]
    assert len(grants) == 3
    refusal = next(r for r in results if isinstance(r, QuotaExceeded))
    assert refusal.details["usage"] == {"tokens_used": 0, "tokens_limit": 100}
    assert refusal.details["plan"] == "tiny"
    await lim.settle([settlement(g, tokens=20) for g in grants])
    more = await asyncio.gather(*(lim.admit(key_id, (), 30, 0) for _ in range(10)))
    assert sum(isinstance(r, Grant) for r in more) == 1  # 60 used + 30 reserved
    report = await lim.usage(key_id)
    assert report is not None
    assert report["limits"]["tokens"] == {"used": 60, "reserved": 30, "limit": 100}
    # Settling twice changes nothing.
    await lim.settle([settlement(g, tokens=20) for g in grants])
    assert (await lim.usage(key_id))["limits"]["tokens"]["used"] == 60  # type: ignore[index]


async def test_every_answer_is_on_disk_and_a_restart_restores_every_hold(
    env: tuple[str, Path],
) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans))
    g1 = await lim.admit(key_id, (), 40, 0)
    g2 = await lim.admit(key_id, (), 40, 0)
    assert isinstance(g1, Grant) and isinstance(g2, Grant)
    await lim.settle([settlement(g1, tokens=25)])
    # No flush: what was answered is already on disk, the outstanding hold included.
    assert stored(db, key_id) == (2, 25, 0, 40)
    assert held(db) == [(g2.epoch, g2.ticket, key_id, 40)]
    # The actor dies (no graceful exit); a new incarnation restores the outstanding hold.
    new = Limiter(db, str(plans))
    assert isinstance(await new.admit(key_id, (), 36, 0), QuotaExceeded)  # 25 + 40 + 36 > 100
    report = await new.usage(key_id)
    assert report is not None and report["limits"]["in_flight"]["used"] == 1  # concurrency too
    await new.settle([settlement(g2, tokens=5)])  # the old ticket settles at the new actor
    await new.settle([settlement(g2, tokens=5)])  # once
    report = await new.usage(key_id)
    assert report is not None
    assert report["limits"]["tokens"] == {"used": 30, "reserved": 0, "limit": 100}
    assert report["limits"]["in_flight"]["used"] == 0
    assert held(db) == []  # settled: nothing is left to be charged later
    assert isinstance(await new.admit(key_id, (), 70, 0), Grant)


async def test_a_restored_concurrency_place_holds_until_its_request_settles(
    tmp_path: Path, database: str
) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text("plans:\n  single: {max_concurrent_requests: 1}\n")
    key_id, _ = new_key(database, "single")
    lim = Limiter(database, str(plans))
    first = await lim.admit(key_id, (), 0, 0)
    assert isinstance(first, Grant)
    new = Limiter(database, str(plans))  # the old one was killed
    busy = await new.admit(key_id, (), 0, 0)
    assert isinstance(busy, RateLimited) and busy.details["limit"] == "max_concurrent_requests"
    await new.settle([settlement(first)])
    assert isinstance(await new.admit(key_id, (), 0, 0), Grant)


async def test_rate_window_survives_a_restart(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "five")
    lim = Limiter(db, str(plans))
    for _ in range(3):
        assert isinstance(await lim.admit(key_id, (), 0, 0), Grant)
    new = Limiter(db, str(plans))  # the old one was killed: its windows are on disk
    results = [await new.admit(key_id, (), 0, 0) for _ in range(5)]
    assert [isinstance(r, Grant) for r in results] == [True, True, False, False, False]


async def test_unsettled_reservations_expire_charged_in_full(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans), {"reservation_ttl_s": 0.01})
    g = await lim.admit(key_id, (), 30, 1)
    assert isinstance(g, Grant)
    await asyncio.sleep(0.02)
    await lim.flush()
    assert stored(db, key_id) == (1, 30, 1, 0)
    await lim.settle([settlement(g, tokens=3)])  # too late: already charged
    assert stored(db, key_id) == (1, 30, 1, 0)


async def test_keys_plans_and_hot_reload(
    env: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, plans = env
    monkeypatch.setattr(limiter_mod, "PLANS_RELOAD_S", 0.0)
    key_id, key = new_key(db, "open")
    lim = Limiter(db, str(plans))
    assert isinstance(await lim.admit(key_id, (), 10, 0), Grant)
    plans.write_text(PLANS.replace("open: {}", "open: {requests_per_minute: 1, models: [m]}"))
    import os

    os.utime(plans, (1, 1))  # a distinct mtime even within the filesystem's resolution
    assert isinstance(await lim.admit(key_id, ("other",), 0, 0), Forbidden)
    assert isinstance(await lim.admit(key_id, ("m",), 0, 0), RateLimited)  # one already taken
    assert isinstance(await lim.admit("000000000000", (), 0, 0), Unauthorized)
    seq = (await lim.key_changes(db, 0)).seq
    store = KeyStore(db)
    store.revoke(key_id)
    store.close()
    await lim.key_changes(db, seq)  # what ingress replicas call every second
    assert isinstance(await lim.admit(key_id, ("m",), 0, 0), Unauthorized)  # not cached 2 s
    assert parse_key(key) == key_id


async def test_monthly_quota_resets_with_the_calendar_month(
    env: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt
    import time

    db, plans = env
    key_id, _ = new_key(db, "tiny")
    end_of_march = dt.datetime(2025, 3, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()
    clock = {"now": end_of_march}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    lim = Limiter(db, str(plans))
    spent = await lim.admit(key_id, (), 90, 0)
    in_flight = await lim.admit(key_id, (), 10, 0)
    assert isinstance(spent, Grant) and isinstance(in_flight, Grant)
    await lim.settle([settlement(spent, tokens=90)])
    assert isinstance(await lim.admit(key_id, (), 1, 0), QuotaExceeded)
    clock["now"] = end_of_march + 2  # April, UTC
    april = await lim.admit(key_id, (), 100, 0)
    assert isinstance(april, Grant) and april.period == "2025-04"
    await lim.settle([settlement(in_flight, tokens=4)])  # counted in March, where it was admitted
    await lim.flush()
    rows = query(db, "SELECT period, requests, tokens, reserved_tokens FROM usage ORDER BY period")
    assert rows == [("2025-03", 2, 94, 0), ("2025-04", 1, 0, 100)]


async def test_late_settlement_of_a_past_period_after_a_restart(
    env: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt
    import time

    db, plans = env
    key_id, _ = new_key(db, "tiny")
    clock = {"now": dt.datetime(2025, 3, 31, 23, 59, tzinfo=dt.timezone.utc).timestamp()}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    old = Limiter(db, str(plans), {"reservation_ttl_s": 60})
    g = await old.admit(key_id, (), 40, 0)
    assert isinstance(g, Grant)
    await old.flush()
    clock["now"] += 120  # April; the actor died and a new one starts
    new = Limiter(db, str(plans), {"reservation_ttl_s": 60})
    assert isinstance(await new.admit(key_id, (), 100, 0), Grant)  # April is untouched
    await new.settle([settlement(g, tokens=11)])
    assert await new.flush() >= 1
    clock["now"] += 120  # past the restored hold's deadline: nothing left to expire
    await new.flush()
    rows = query(db, "SELECT period, tokens, reserved_tokens FROM usage ORDER BY period")
    # March: the late settlement released the restored hold. April: never settled within the
    # TTL, so charged in full.
    assert rows == [("2025-03", 11, 0), ("2025-04", 100, 0)]


async def test_key_changes_follow_the_store(env: tuple[str, Path]) -> None:
    """What ingress replicas copy: every key first, then only what changed."""
    db, plans = env
    first, _ = new_key(db, "open")
    lim = Limiter(db, str(plans))
    full = await lim.key_changes("", 0)
    assert full.full and {r.id for r in full.records} >= {first} and full.source == db
    assert all(r.key_hash for r in full.records)  # hashes, for verification in the ingress
    nothing = await lim.key_changes(full.source, full.seq)
    assert not nothing.full and nothing.records == () and nothing.seq == full.seq
    second, _ = new_key(db, "five")
    store = KeyStore(db)
    store.revoke(first)
    store.db.execute("DELETE FROM api_keys WHERE id = ?", (second,))
    store.close()
    changed = await lim.key_changes(full.source, full.seq)
    assert not changed.full and changed.seq > full.seq
    assert [(r.id, r.revoked) for r in changed.records] == [(first, True)]
    assert changed.removed == (second,)
    # Another database, or a change number it never reached: every key again.
    assert (await lim.key_changes("/elsewhere.db", full.seq)).full
    assert (await lim.key_changes(full.source, changed.seq + 100)).full
    assert (await lim.info())["calls"]["key_changes"] == 5


async def test_a_void_settlement_gives_the_request_back(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "five")  # 5 requests a minute
    lim = Limiter(db, str(plans))
    grants = [await lim.admit(key_id, (), 10, 0) for _ in range(5)]
    assert isinstance(await lim.admit(key_id, (), 10, 0), RateLimited)
    await lim.settle([dataclasses.replace(settlement(g), counted=False) for g in grants[:2]])
    assert isinstance(await lim.admit(key_id, (), 10, 0), Grant)  # two slots came back
    report = await lim.usage(key_id)
    assert report is not None and report["limits"]["requests"]["used"] == 4
    assert report["limits"]["tokens"]["used"] == 0
    info = await lim.info()
    assert info["decided"] == {200: 6, 429: 1} and info["holds"] == 4


class Replica:
    """An ingress replica's actor handle, alive or dead, as the limiter pings it."""

    def __init__(self) -> None:
        self.dead = False
        self.__ray_ready__ = self

    def remote(self) -> Any:
        async def ready() -> bool:
            if self.dead:
                raise ray.exceptions.ActorDiedError()
            return True

        return ready()


async def test_holds_of_a_dead_ingress_replica_are_voided(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans))
    alive, doomed = Replica(), Replica()
    await lim.register("alive", alive)
    await lim.register("doomed", doomed)
    _, kept = await lim.exchange([], [(key_id, (), 30, 0, None)], "alive")
    _, lost = await lim.exchange(
        [], [(key_id, (), 30, 0, None), (key_id, (), 20, 1, None)], "doomed"
    )
    assert all(isinstance(g, Grant) for g in [*kept, *lost])
    assert await lim.void_dead_owners() == 0  # both answer
    doomed.dead = True
    assert await lim.void_dead_owners() == 2
    report = await lim.usage(key_id)
    assert report is not None
    assert report["limits"]["requests"]["used"] == 1  # the live replica's request only
    assert report["limits"]["tokens"] == {"used": 0, "reserved": 30, "limit": 100}
    assert report["limits"]["images"] == {"used": 0, "reserved": 0, "limit": 2}
    # A settlement that arrives anyway (it was on its way) changes nothing.
    await lim.settle([settlement(lost[0], tokens=30)])  # type: ignore[arg-type]
    assert (await lim.usage(key_id))["limits"]["tokens"]["used"] == 0  # type: ignore[index]
    info = await lim.info()
    assert info["voided"] == 2 and info["owners"] == 1 and info["holds"] == 1


ANSWER = Answer(200, (("content-type", "application/json"),), b'{"usage": 7}')


async def test_a_repeated_idempotency_key_is_answered_again_and_billed_once(
    env: tuple[str, Path],
) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    other_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans))
    idem = ("k-1", "fingerprint")
    first = await lim.admit(key_id, (), 30, 0, idem)
    assert isinstance(first, Grant)
    assert isinstance(await lim.admit(key_id, (), 30, 0, idem), InProgress)
    # The same key from another API key is another request.
    assert isinstance(await lim.admit(other_id, (), 30, 0, idem), Grant)
    waiting = asyncio.ensure_future(lim.wait_answer(key_id, "k-1", 10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    await lim.settle([dataclasses.replace(settlement(first, tokens=7), answer=ANSWER)])
    await asyncio.wait_for(waiting, 1.0)  # the waiting repeat is woken at once
    for _ in range(3):
        assert await lim.admit(key_id, (), 30, 0, idem) == Replay(ANSWER)
    refused = await lim.admit(key_id, (), 30, 0, ("k-1", "another body"))
    assert isinstance(refused, BadRequest) and "different request" in refused.message
    report = await lim.usage(key_id)
    assert report is not None
    assert report["limits"]["requests"]["used"] == 1
    assert report["limits"]["tokens"] == {"used": 7, "reserved": 0, "limit": 100}
    info = await lim.info()
    assert info["idempotent"] == {"entries": 2, "bytes": len(ANSWER.body), "replayed": 3}


async def test_a_repeat_runs_afresh_when_its_first_attempt_gave_no_answer(
    env: tuple[str, Path],
) -> None:
    db, plans = env
    key_id, _ = new_key(db, "tiny")
    lim = Limiter(db, str(plans))
    doomed = Replica()
    await lim.register("doomed", doomed)
    # The first attempt's ingress dies before answering: its hold is voided, a repeat runs.
    _, [lost] = await lim.exchange([], [(key_id, (), 30, 0, ("k-1", "f"))], "doomed")
    assert isinstance(await lim.admit(key_id, (), 30, 0, ("k-1", "f")), InProgress)
    doomed.dead = True
    assert await lim.void_dead_owners() == 1
    again = await lim.admit(key_id, (), 30, 0, ("k-1", "f"))
    assert isinstance(again, Grant) and isinstance(lost, Grant)
    # An error (or an answer cut by its client, delivered without an answer) is not kept.
    failed = dataclasses.replace(settlement(again), answer=dataclasses.replace(ANSWER, status=500))
    await lim.settle([failed])
    third = await lim.admit(key_id, (), 30, 0, ("k-1", "f"))
    assert isinstance(third, Grant)
    await lim.settle([settlement(third, tokens=5)])
    fourth = await lim.admit(key_id, (), 30, 0, ("k-1", "f"))
    assert isinstance(fourth, Grant)
    await lim.settle([dataclasses.replace(settlement(fourth, tokens=9), answer=ANSWER)])
    assert await lim.admit(key_id, (), 30, 0, ("k-1", "f")) == Replay(ANSWER)
    report = await lim.usage(key_id)
    assert report is not None  # the voided attempt counts nothing; the others each count
    assert report["limits"]["requests"]["used"] == 3
    assert report["limits"]["tokens"]["used"] == 14


async def test_replays_pass_the_request_rate(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "five")  # 5 requests a minute
    lim = Limiter(db, str(plans))
    first = await lim.admit(key_id, (), 0, 0, ("k", "f"))
    assert isinstance(first, Grant)
    await lim.settle([dataclasses.replace(settlement(first), answer=ANSWER)])
    replays = [await lim.admit(key_id, (), 0, 0, ("k", "f")) for _ in range(5)]
    assert replays[:4] == [Replay(ANSWER)] * 4 and isinstance(replays[4], RateLimited)
    report = await lim.usage(key_id)
    assert report is not None and report["limits"]["requests"]["used"] == 1


def test_kept_answers_are_bounded_by_bytes_and_age() -> None:
    answers = Answers(ttl_s=10.0, max_mb=1600 / 2**20)  # 1600 bytes; answers up to 100 kept
    body = Answer(200, (), b"x" * 100)
    for n in range(20):
        answers.begin(("key", f"k{n}"), "f", n)
        answers.finish(n, body, now=float(n))
    assert answers.bytes == 1600 and len(answers) == 16
    assert answers.find(("key", "k3"), now=19.0) is None  # the oldest went first
    assert answers.find(("key", "k4"), now=13.9) is not None
    assert answers.find(("key", "k4"), now=14.0) is None  # past its age
    answers.expire(now=30.0)
    assert answers.bytes == 0 and len(answers) == 0
    answers.begin(("key", "big"), "f", 99)
    answers.finish(99, Answer(200, (), b"x" * 101), now=0.0)
    assert answers.find(("key", "big"), now=0.0) is None  # too large to keep
    assert valid_key("9b1f-xyz") and not valid_key("") and not valid_key("a b")
    assert not valid_key("k" * 256)


async def test_callers_of_one_moment_share_a_group_commit(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "open")
    lim = Limiter(db, str(plans))
    grants = await asyncio.gather(*(lim.admit(key_id, (), 1, 0) for _ in range(40)))
    assert all(isinstance(g, Grant) for g in grants)
    assert len(held(db)) == 40  # every one answered, every one on disk
    assert (await lim.info())["commits"] < 40  # in fewer transactions than answers


async def test_a_failed_commit_answers_nothing(env: tuple[str, Path]) -> None:
    db, plans = env
    key_id, _ = new_key(db, "open")
    lim = Limiter(db, str(plans))
    lost: list[BaseException] = []
    lim.lost = lost.append
    lim.journal.db.close()  # the disk goes away
    with pytest.raises(Exception, match="closed"):
        await lim.admit(key_id, (), 1, 0)
    assert len(lost) == 1  # the actor would exit here, and restart from the database


async def test_only_owners_of_restored_holds_are_looked_up_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica holding this incarnation's admissions is judged by its handle only (it registers
    with its first admission); one of an earlier incarnation's holds that has not registered
    again is looked up by its name, and is dead when no actor has that name any more."""
    from voltage_ray.limits import owners as owners_mod

    looked_up: list[str] = []

    def find(name: str) -> Any:
        looked_up.append(name)
        return False  # no such actor

    monkeypatch.setattr(owners_mod, "_find", find)
    owners = owners_mod.Owners()
    owners.hold("new", ("e2", 1), "serve/new")  # registration still on its way
    owners.hold("old", ("e1", 7), "serve/old", restored=True)
    assert await owners.dead(1.0) == ["old"]
    assert looked_up == ["serve/old"]


async def test_a_commit_larger_than_one_statement_writes_and_deletes_every_hold(
    env: tuple[str, Path],
) -> None:
    """Holds are written and deleted in multi-row statements of ROWS_PER_STATEMENT rows: one
    commit of more than two statements' worth, then their settlements in one commit, leave
    exactly the holds still outstanding."""
    from voltage_ray.limits.usage import ROWS_PER_STATEMENT

    db, plans = env
    key_id, _ = new_key(db, "open")
    lim = Limiter(db, str(plans))
    n = 2 * ROWS_PER_STATEMENT + 7
    epoch, grants = await lim.exchange([], [(key_id, (), 3, 0, None)] * n)
    assert all(isinstance(g, Grant) for g in grants)
    assert [t for _, t, _, _ in held(db)] == sorted(g.ticket for g in grants)
    keep = grants[ROWS_PER_STATEMENT - 1 : ROWS_PER_STATEMENT + 2]  # across a statement's edge
    await lim.exchange([settlement(g, 2) for g in grants if g not in keep], [])
    assert held(db) == sorted((epoch, g.ticket, key_id, 3) for g in keep)
    assert stored(db, key_id) == (n, 2 * (n - len(keep)), 0, 3 * len(keep))


async def test_a_group_commit_runs_in_place_of_an_idle_writer_and_after_a_busy_one(
    tmp_path: Path,
) -> None:
    """SQLite's group commits run on the event loop when the writer thread is idle; while the
    writer runs another job (a stored response) they wait for it and go through the thread,
    never on its connection at the same time."""
    import threading

    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    db = str(tmp_path / "v.db")
    key_id, _ = new_key(db, "open")
    lim = Limiter(db, str(plans))
    writer = lim.journal.writer
    assert lim.journal.inline
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []
    real_write = limiter_mod.usage_db.write

    def write(*args: Any) -> None:
        threads.append(threading.current_thread())
        real_write(*args)

    limiter_mod.usage_db.write = write  # the journal's module is the same object
    try:
        assert isinstance(await lim.admit(key_id, (), 1, 0), Grant)
        assert threads == [loop_thread]  # idle writer: committed in its place

        release = threading.Event()
        started = threading.Event()

        def other_job() -> None:  # a stored response being written, say
            started.set()
            release.wait(10)

        job = writer.submit(other_job)
        assert started.wait(10)
        assert not writer.run_here(lambda: None)  # busy: nothing runs beside it
        admit = asyncio.ensure_future(lim.admit(key_id, (), 1, 0))
        await asyncio.sleep(0.2)
        assert not admit.done()  # not answered before its commit
        release.set()
        assert isinstance(await asyncio.wait_for(admit, 10), Grant)
        job.result(10)
        assert threads[1] is not loop_thread  # went through the writer's thread
        assert len(held(db)) == 2
    finally:
        limiter_mod.usage_db.write = real_write
