"""Stored responses on both databases: every operation, owner isolation, expiry, the guard that
keeps a cancellation, atomic claims of background runs, durability across a reopen; and the
limiter's side: the store's operations run on the journal's writer thread, group commits first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.limits.db import Database
from voltage_ray.limits.journal import Writer
from voltage_ray.limits.limiter import Limiter
from voltage_ray.limits.responses import ResponseStore, StoredResponse

NOW = 1_800_000_000.0
DAY = 86_400.0


def record(ident: str = "resp_1", owner: str = "key_a", **fields: Any) -> StoredResponse:
    base = StoredResponse(
        id=ident,
        owner=owner,
        model="smol",
        status="completed",
        response={"id": ident, "object": "response", "status": "completed", "output": []},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}],
        conversation=[{"type": "message", "role": "user", "content": "hi"}],
        created_at=NOW,
        expires_at=NOW + DAY,
    )
    return replace(base, **fields)


def run(ident: str, created_at: float = NOW, **fields: Any) -> StoredResponse:
    """A background run still to do."""
    todo: dict[str, Any] = {
        "status": "queued",
        "response": {"id": ident, "status": "queued"},
        "request": {"model": "smol", "input": "hi", "background": True},
        "background": True,
        "created_at": created_at,
    }
    return record(ident, **{**todo, **fields})


@pytest.fixture()
def store(database: str) -> Any:
    db = Database(database)
    yield ResponseStore(db)
    db.close()


def test_put_and_get_round_trip_every_field(store: ResponseStore) -> None:
    big = [{"type": "message", "role": "user", "content": "ü€😀 " * 20_000}] * 5  # ~1 MB
    stored = run("resp_big", conversation=big, lease_owner="r1", lease_until=NOW + 30)
    store.put(stored)
    assert store.get("resp_big", "key_a", now=NOW) == stored
    store.put(replace(stored, status="completed", request=None, lease_owner=None, lease_until=None))
    again = store.get("resp_big", "key_a", now=NOW)
    assert again is not None and again.status == "completed" and again.request is None
    assert again.lease_owner is None and again.lease_until is None


def test_text_no_database_can_hold_is_escaped(store: ResponseStore) -> None:
    odd = {"type": "message", "content": "nul \x00 lone \ud800 end"}
    store.put(record(conversation=[odd]))
    got = store.get("resp_1", "key_a", now=NOW)
    assert got is not None and got.conversation == [odd]


def test_another_keys_response_is_missing(store: ResponseStore) -> None:
    store.put(run("resp_1"))
    assert store.get("resp_1", "key_b", now=NOW) is None
    assert store.cancel("resp_1", "key_b", now=NOW) is None
    assert store.delete("resp_1", "key_b", now=NOW) is False
    assert store.get("resp_1", "key_a", now=NOW) is not None  # untouched
    assert store.get("resp_nope", "key_a", now=NOW) is None


def test_delete(store: ResponseStore) -> None:
    store.put(record())
    assert store.delete("resp_1", "key_a", now=NOW) is True
    assert store.get("resp_1", "key_a", now=NOW) is None
    assert store.delete("resp_1", "key_a", now=NOW) is False


def test_expired_responses_are_missing_then_deleted(store: ResponseStore) -> None:
    store.put(record("resp_old", expires_at=NOW + 10))
    store.put(record("resp_new", expires_at=NOW + DAY))
    store.put(run("resp_run", expires_at=NOW + 10))
    later = NOW + 11
    assert store.get("resp_old", "key_a", now=NOW + 10) is not None  # expires_at itself: kept
    assert store.get("resp_old", "key_a", now=later) is None
    assert store.cancel("resp_old", "key_a", now=later) is None
    assert store.delete("resp_old", "key_a", now=later) is False
    assert store.claim("r1", 30, 10, now=later) == []  # an expired run is not run again
    assert store.expire(now=later) == 2
    assert store.expire(now=later) == 0
    assert store.get("resp_new", "key_a", now=later) is not None
    assert store.get("resp_old", "key_a", now=NOW) is None  # gone, not just hidden


def test_expire_deletes_in_batches(store: ResponseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from voltage_ray.limits import responses

    monkeypatch.setattr(responses, "EXPIRE_BATCH", 3)
    for i in range(7):
        store.put(record(f"resp_{i}", expires_at=NOW))
    assert store.expire(now=NOW + 1, limit=4) == 4
    assert store.expire(now=NOW + 1) == 3


def test_a_cancellation_is_never_overwritten(store: ResponseStore) -> None:
    store.put(run("resp_1"))
    assert store.set_status("resp_1", "in_progress", {"id": "resp_1", "status": "in_progress"})
    cancelled = store.cancel("resp_1", "key_a", now=NOW)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.response == {"id": "resp_1", "status": "cancelled"}
    assert store.get("resp_1", "key_a", now=NOW) == cancelled
    done = {"id": "resp_1", "status": "completed"}
    assert store.finish("resp_1", done, "completed", [{"type": "message"}]) is False
    assert store.set_status("resp_1", "in_progress", done) is False
    assert store.get("resp_1", "key_a", now=NOW) == cancelled
    assert store.cancel("resp_1", "key_a", now=NOW) == cancelled  # again: unchanged


def test_finish_applies_once_and_a_finished_response_stays(store: ResponseStore) -> None:
    store.put(run("resp_1", lease_owner="r1", lease_until=NOW + 30))
    conversation = [{"type": "message", "role": "user"}, {"type": "message", "role": "assistant"}]
    done = {"id": "resp_1", "status": "completed", "output": [{"type": "message"}]}
    assert store.finish("resp_1", done, "completed", conversation) is True
    finished = store.get("resp_1", "key_a", now=NOW)
    assert finished is not None and finished.status == "completed"
    assert finished.response == done and finished.conversation == conversation
    assert finished.lease_owner is None and finished.lease_until is None
    assert store.finish("resp_1", {"status": "failed"}, "failed", []) is False
    assert store.cancel("resp_1", "key_a", now=NOW) == finished  # the route decides the answer
    assert store.finish("resp_missing", done, "completed", []) is False
    with pytest.raises(ValueError):
        store.finish("resp_1", done, "in_progress", [])
    with pytest.raises(ValueError):
        store.set_status("resp_1", "completed", done)


def test_claim_renew_and_a_lapsed_lease(store: ResponseStore) -> None:
    store.put(run("resp_b", created_at=NOW + 1))
    store.put(run("resp_a", created_at=NOW))
    store.put(record("resp_done", background=True))  # finished: nothing to run
    store.put(run("resp_fg", background=False))  # not a background run
    first = store.claim("r1", 30, 1, now=NOW)
    assert [r.id for r in first] == ["resp_a"]  # oldest first
    assert first[0].lease_owner == "r1" and first[0].lease_until == NOW + 30
    assert first[0].request == {"model": "smol", "input": "hi", "background": True}
    assert [r.id for r in store.claim("r2", 30, 10, now=NOW)] == ["resp_b"]
    assert store.claim("r3", 30, 10, now=NOW + 10) == []  # both leased
    assert store.renew("resp_a", "r1", 30, now=NOW + 20) == "queued"
    assert store.renew("resp_a", "r2", 30, now=NOW + 20) is None  # not r2's lease
    # r2 died: its lease lapses and another replica takes the run over.
    taken = store.claim("r3", 30, 10, now=NOW + 40)
    assert [r.id for r in taken] == ["resp_b"] and taken[0].lease_owner == "r3"
    assert store.renew("resp_b", "r2", 30, now=NOW + 41) is None  # r2 must stop
    assert store.cancel("resp_b", "key_a", now=NOW + 41) is not None
    assert store.renew("resp_b", "r3", 30, now=NOW + 42) == "cancelled"  # the runner stops
    # resp_a's lease lapsed too; the cancelled one is not run again.
    again = store.claim("r4", 30, 10, now=NOW + 100)
    assert [(r.id, r.lease_owner, r.lease_until) for r in again] == [("resp_a", "r4", NOW + 130)]
    assert store.finish("resp_a", {"status": "completed"}, "completed", [])
    assert store.renew("resp_a", "r4", 30, now=NOW + 101) is None  # finished: lease released


def test_two_claimers_never_get_the_same_run(database: str) -> None:
    setup = ResponseStore(Database(database))
    runs = 200
    for i in range(runs):
        setup.put(run(f"resp_{i:03d}", created_at=NOW + i))
    setup.db.close()
    stores = [ResponseStore(Database(database)) for _ in range(2)]
    got: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def claimer(i: int) -> None:
        start.wait()
        while batch := stores[i].claim(f"r{i}", 60, 7, now=NOW):
            got[i].extend(r.id for r in batch)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.db.close()
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == [f"resp_{i:03d}" for i in range(runs)]


def test_what_was_written_survives_a_reopen(database: str) -> None:
    db = Database(database)
    store = ResponseStore(db)
    store.put(run("resp_1"))
    store.put(record("resp_2"))
    store.claim("r1", 30, 10, now=NOW)
    cancelled = store.cancel("resp_1", "key_a", now=NOW)
    assert store.delete("resp_2", "key_a", now=NOW)
    db.close()
    reopened = ResponseStore(Database(database))
    try:
        assert reopened.get("resp_1", "key_a", now=NOW) == cancelled
        assert reopened.get("resp_2", "key_a", now=NOW) is None
    finally:
        reopened.db.close()


def test_group_commits_go_before_other_writes() -> None:
    writer = Writer("test")
    order: list[str] = []
    gate = threading.Event()
    first = writer.submit(gate.wait, 10)  # the piece under way
    others = [writer.submit(order.append, f"other{i}") for i in range(3)]
    urgent = writer.submit(order.append, "commit", urgent=True)
    gate.set()
    for future in [first, *others, urgent]:
        future.result(10)
    assert order == ["commit", "other0", "other1", "other2"]
    writer.close()


async def test_the_limiter_runs_store_operations(tmp_path: Path, database: str) -> None:
    (tmp_path / "plans.yaml").write_text("plans:\n  open: {}\n")
    limiter = Limiter(database, str(tmp_path / "plans.yaml"))
    now = time.time()
    limiter.responses.put(record("resp_old", created_at=now - DAY, expires_at=now - 1))
    await limiter.flush()  # its tasks start: expired responses are deleted at once
    for _ in range(100):
        if limiter.store.db.one("SELECT count(*) FROM responses")[0] == 0:  # type: ignore[index]
            break
        await asyncio.sleep(0.05)
    assert limiter.store.db.one("SELECT count(*) FROM responses") == (0,)
    stored = record(created_at=now, expires_at=now + DAY)
    await limiter.response("put", stored)
    assert await limiter.response("get", "resp_1", "key_a") == stored
    assert await limiter.response("get", "resp_1", "key_b") is None
    assert await asyncio.gather(*(limiter.response("get", "resp_1", "key_a") for _ in range(20)))
    assert await limiter.response("delete", "resp_1", "key_a") is True
    with pytest.raises(ValueError):
        await limiter.response("close")  # only the store's operations
    assert (await limiter.info())["calls"]["response.get"] == 22
    # SQLite: one writer thread, commits first; PostgreSQL: responses commit beside them.
    shared = limiter._responses_writer is limiter.journal.writer
    assert shared == (limiter.journal.db.dialect == "sqlite")
    limiter.store.close()
    limiter.journal.close()
