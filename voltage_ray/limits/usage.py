"""Durable usage: per key and period counters, the minute windows, and every outstanding hold, in
the service's database (``limits/db.py``: SQLite or PostgreSQL).

The limiter actor is the only writer. Each of its group commits writes, in one transaction, the
rows its decisions changed: usage rows and windows as absolute values (a retried or repeated write
is harmless), the holds of the requests it admitted, and the deletion of the holds it settled or
voided. It answers those requests only once the transaction is on disk, so what it acknowledged
survives its death: a restarted limiter finds exactly the holds still outstanding, with their
owners, and a settlement of any incarnation's hold releases exactly that hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from voltage_ray.limits.db import Database
from voltage_ray.limits.quota import MINUTE, KeyState, Usage, Window

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    requests {int} NOT NULL DEFAULT 0,
    tokens {int} NOT NULL DEFAULT 0,
    images {int} NOT NULL DEFAULT 0,
    reserved_tokens {int} NOT NULL DEFAULT 0,
    reserved_images {int} NOT NULL DEFAULT 0,
    updated_at {real} NOT NULL,
    PRIMARY KEY (key_id, period)
);;
CREATE TABLE IF NOT EXISTS rate_windows (
    key_id TEXT PRIMARY KEY,
    requests TEXT NOT NULL,
    tokens TEXT NOT NULL,
    updated_at {real} NOT NULL
);;
CREATE TABLE IF NOT EXISTS holds (
    epoch TEXT NOT NULL,
    ticket {int} NOT NULL,
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    tokens {int} NOT NULL,
    images {int} NOT NULL,
    owner TEXT NOT NULL,
    owner_name TEXT NOT NULL,
    deadline {real} NOT NULL,
    PRIMARY KEY (epoch, ticket)
);;
"""

_UPSERT_USAGE = """
INSERT INTO usage (key_id, period, requests, tokens, images, reserved_tokens, reserved_images,
                   updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_id, period) DO UPDATE SET
    requests = excluded.requests, tokens = excluded.tokens, images = excluded.images,
    reserved_tokens = excluded.reserved_tokens, reserved_images = excluded.reserved_images,
    updated_at = excluded.updated_at
"""

_UPSERT_WINDOWS = """
INSERT INTO rate_windows (key_id, requests, tokens, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (key_id) DO UPDATE SET
    requests = excluded.requests, tokens = excluded.tokens, updated_at = excluded.updated_at
"""

# A group commit writes its holds in a few multi-row statements, not a statement per row: each
# statement's step gives up and retakes the GIL, which the limiter's other threads hold most of the
# time under load (benchmarks/limits.py, 4 callers: a commit of ~60 new and ~60 settled holds took
# 2.2 ms row by row, 1.8 ms so).
ROWS_PER_STATEMENT = 500  # 4,500 parameters, under SQLite's 32,766 and PostgreSQL's 65,535
_INSERT_HOLDS = (
    "INSERT INTO holds (epoch, ticket, key_id, period, tokens, images, owner, owner_name, "
    "deadline) VALUES "
)
_HOLD_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"

HoldId = tuple[str, int]  # (the limiter incarnation that admitted it, its ticket)


@dataclass(frozen=True)
class HoldRow:
    """An outstanding admission as stored: what it reserved, and the ingress replica holding it
    (``owner``: its actor id, ``owner_name``: ``namespace/name`` to find it again)."""

    epoch: str
    ticket: int
    key_id: str
    period: str
    tokens: int
    images: int
    owner: str
    owner_name: str
    deadline: float

    @property
    def id(self) -> HoldId:
        return (self.epoch, self.ticket)


@dataclass(frozen=True)
class WindowRow:
    key_id: str
    requests: list[tuple[float, int]]
    tokens: list[tuple[float, int]]


@dataclass
class Changes:
    """What one group commit writes."""

    usages: list[tuple[str, Usage]]
    windows: list[WindowRow]
    new_holds: list[HoldRow]
    gone_holds: list[HoldId]

    def __bool__(self) -> bool:
        return bool(self.usages or self.windows or self.new_holds or self.gone_holds)


def ensure_schema(db: Database) -> None:
    sqlite = _SCHEMA.format(int="INTEGER", real="REAL")
    postgres = _SCHEMA.format(int="BIGINT", real="DOUBLE PRECISION")
    with db.transaction():
        if db.dialect == "postgres":  # two processes creating the schema at once
            db.execute("SELECT pg_advisory_xact_lock(7370010)")
        db.schema(sqlite, postgres)


def load_usage(db: Database, key_id: str, period: str) -> Usage:
    """A key's stored usage for a period, its outstanding reservations included."""
    row = db.one(
        "SELECT requests, tokens, images, reserved_tokens, reserved_images FROM usage "
        "WHERE key_id = ? AND period = ?",
        (key_id, period),
    )
    if row is None:
        return Usage(period)
    return Usage(period, *(int(v) for v in row))


def load_state(db: Database, key_id: str, now: float) -> KeyState:
    """A key's minute windows as last written (entries older than a minute drop out)."""
    row = db.one("SELECT requests, tokens FROM rate_windows WHERE key_id = ?", (key_id,))
    state = KeyState()
    if row is not None:
        state.requests = Window(MINUTE, (tuple(e) for e in json.loads(row[0])))
        state.tokens = Window(MINUTE, (tuple(e) for e in json.loads(row[1])))
        state.requests.prune(now)
        state.tokens.prune(now)
    return state


def load_holds(db: Database) -> list[HoldRow]:
    """Every outstanding hold, of whichever incarnation admitted it."""
    rows = db.all(
        "SELECT epoch, ticket, key_id, period, tokens, images, owner, owner_name, deadline "
        "FROM holds ORDER BY deadline"
    )
    return [
        HoldRow(str(e), int(t), str(k), str(p), int(tok), int(img), str(o), str(n), float(d))
        for e, t, k, p, tok, img, o, n, d in rows
    ]


def write(db: Database, changes: Changes, now: float | None = None) -> None:
    """One group commit: every changed row in one durable transaction."""
    now = time.time() if now is None else now
    usage_rows = [
        (k, u.period, u.requests, u.tokens, u.images, u.reserved_tokens, u.reserved_images, now)
        for k, u in changes.usages
    ]
    window_rows = [
        (w.key_id, json.dumps(w.requests), json.dumps(w.tokens), now) for w in changes.windows
    ]
    hold_rows = [
        (h.epoch, h.ticket, h.key_id, h.period, h.tokens, h.images, h.owner, h.owner_name,
         h.deadline)
        for h in changes.new_holds
    ]  # fmt: skip
    gone: dict[str, list[int]] = {}
    for epoch, ticket in changes.gone_holds:
        gone.setdefault(epoch, []).append(ticket)
    with db.transaction():
        db.executemany(_UPSERT_USAGE, usage_rows)
        db.executemany(_UPSERT_WINDOWS, window_rows)
        for rows in _chunks(hold_rows):
            db.execute(_INSERT_HOLDS + ", ".join([_HOLD_VALUES] * len(rows)), _flat(rows))
        for epoch, tickets in gone.items():
            for part in _chunks(tickets):
                marks = ", ".join("?" * len(part))
                sql = f"DELETE FROM holds WHERE epoch = ? AND ticket IN ({marks})"
                db.execute(sql, [epoch, *part])


def _chunks(rows: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        yield rows[start : start + ROWS_PER_STATEMENT]


def _flat(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]


def period_usage(db: Database, period: str) -> dict[str, Usage]:
    """Every key's stored usage in a period (for the `usage` command)."""
    rows = db.all(
        "SELECT key_id, requests, tokens, images, reserved_tokens, reserved_images FROM usage "
        "WHERE period = ?",
        (period,),
    )
    return {
        str(key_id): Usage(period, int(req), int(tok), int(img), int(rtok), int(rimg))
        for key_id, req, tok, img, rtok, rimg in rows
    }


def outstanding(rows: Iterable[HoldRow]) -> dict[str, int]:
    """Holds per key: the requests each key has in flight (its concurrency count)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.key_id] = counts.get(row.key_id, 0) + 1
    return counts
