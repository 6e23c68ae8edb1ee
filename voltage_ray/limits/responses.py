"""Stored responses (``/v1/responses`` with ``store``): one row per response in the service's
database (``limits/db.py``: SQLite or PostgreSQL), as durable as metering.

Every operation is one transaction, committed (fsynced) before it returns. The limiter actor runs
them off its event loop: with SQLite on its journal's writer thread (``limits/journal.py``), after
any group commit waiting, so a large conversation holds an admission back by at most the one
write under way; with PostgreSQL on a connection and thread of their own. Ingress
replicas reach them through the limiter (:class:`~voltage_ray.limits.client.ResponsesClient`),
since with SQLite only the limiter's node has the file.

A row holds what each route needs in one read: ``response`` (the Response object GET returns),
``input_items`` (GET ``/responses/{id}/input_items``), and ``conversation``: every input item of
the conversation up to and including this response's output, so a ``previous_response_id``
continuation reads one row. Reads by id name the owner (the API key id that created it): a
missing, expired or other key's response is the same ``None``, so callers answer 404 alike.

Background runs keep their request (``request``) and a lease: a runner renews its lease while it
runs (and learns of a cancellation from the status it gets back); a run whose lease lapsed (its
ingress replica died) is claimed, atomically, by another replica, which runs it again. Final
states are written only over ``queued`` or ``in_progress``, so a cancellation is never undone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

from voltage_ray.limits.db import Database

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
ACTIVE: tuple[str, ...] = ("queued", "in_progress")
FINAL: tuple[str, ...] = ("completed", "incomplete", "failed", "cancelled")
EXPIRE_BATCH = 100  # rows deleted per transaction by expire(): a short hold of the writer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL,
    request TEXT,
    background INTEGER NOT NULL,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL,
    lease_owner TEXT,
    lease_until {real}
);;
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);;
CREATE INDEX IF NOT EXISTS responses_runs ON responses (lease_until)
    WHERE background = 1 AND status IN ('queued', 'in_progress');;
"""
_COLUMNS = (
    "id, owner, model, status, response, input_items, conversation, request, background, "
    "created_at, expires_at, lease_owner, lease_until"
)
_UPSERT = f"""
INSERT INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    owner = excluded.owner, model = excluded.model, status = excluded.status,
    response = excluded.response, input_items = excluded.input_items,
    conversation = excluded.conversation, request = excluded.request,
    background = excluded.background, created_at = excluded.created_at,
    expires_at = excluded.expires_at, lease_owner = excluded.lease_owner,
    lease_until = excluded.lease_until
"""
_ACTIVE_SQL = "status IN ('queued', 'in_progress')"
_UNLEASED = "(lease_until IS NULL OR lease_until < ?)"


@dataclass(frozen=True)
class StoredResponse:
    """One stored response, its JSON columns decoded. ``expires_at`` is set by whoever makes
    the record (the ingress: ``created_at + responses.ttl_s``)."""

    id: str
    owner: str  # the API key id that created it
    model: str
    status: Status
    response: dict[str, Any]  # the Response object, as GET returns it
    input_items: list[dict[str, Any]]  # this response's input items, as item resources
    conversation: list[dict[str, Any]]  # every input item so far, this response's output too
    request: dict[str, Any] | None = None  # a background run's CreateResponse body
    background: bool = False
    created_at: float = 0.0
    expires_at: float = 0.0
    lease_owner: str | None = None
    lease_until: float | None = None


def ensure_schema(db: Database) -> None:
    sqlite = _SCHEMA.format(real="REAL")
    postgres = _SCHEMA.format(real="DOUBLE PRECISION")
    with db.transaction():
        if db.dialect == "postgres":  # two processes creating the schema at once
            db.execute("SELECT pg_advisory_xact_lock(7370012)")
        db.schema(sqlite, postgres)


def _dumps(value: Any) -> str:
    """Compact JSON, UTF-8 as it is; ASCII escapes only for text no database can store (a lone
    surrogate). NUL and other control characters are always escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return text


def _record(row: tuple[Any, ...]) -> StoredResponse:
    ident, owner, model, status, response, items, conversation, request = row[:8]
    background, created, expires, lease_owner, lease_until = row[8:]
    return StoredResponse(
        str(ident), str(owner), str(model), status, json.loads(response), json.loads(items),
        json.loads(conversation), json.loads(request) if request is not None else None,
        bool(background), float(created), float(expires), lease_owner,
        float(lease_until) if lease_until is not None else None,
    )  # fmt: skip


class ResponseStore:
    """The ``responses`` table. Each method is one durable transaction; a connection is used by
    one thread at a time (in the limiter, one writer thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        ensure_schema(db)

    def put(self, record: StoredResponse) -> None:
        """Insert ``record``, or replace the response with its id."""
        if record.status not in (*ACTIVE, *FINAL):
            raise ValueError(f"unknown response status {record.status!r}")
        r = record
        row = (
            r.id, r.owner, r.model, r.status, _dumps(r.response), _dumps(r.input_items),
            _dumps(r.conversation), _dumps(r.request) if r.request is not None else None,
            int(r.background), r.created_at, r.expires_at, r.lease_owner, r.lease_until,
        )  # fmt: skip
        with self.db.transaction():
            self.db.execute(_UPSERT, row)

    def get(self, response_id: str, owner: str, now: float | None = None) -> StoredResponse | None:
        """The response, or None when it is missing, expired or another key's."""
        return self._find(response_id, owner, now)

    def _find(
        self, response_id: str, owner: str, now: float | None, lock: bool = False
    ) -> StoredResponse | None:
        sql = f"SELECT {_COLUMNS} FROM responses WHERE id = ? AND owner = ? AND expires_at >= ?"
        if lock and self.db.dialect == "postgres":
            sql += " FOR UPDATE"
        row = self.db.one(sql, (response_id, owner, _now(now)))
        return _record(row) if row is not None else None

    def delete(self, response_id: str, owner: str, now: float | None = None) -> bool:
        """Delete the response; False when it is missing, expired or another key's."""
        with self.db.transaction():
            cursor = self.db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at >= ?",
                (response_id, owner, _now(now)),
            )
            return bool(cursor.rowcount > 0)

    def finish(
        self,
        response_id: str,
        response: dict[str, Any],
        status: Status,
        conversation: list[dict[str, Any]],
    ) -> bool:
        """Store a final state (and release the lease), only over ``queued`` or ``in_progress``:
        whether it applied (not over a cancellation, nor a deleted response)."""
        if status not in FINAL:
            raise ValueError(f"{status!r} is not a final status")
        sql = (
            "UPDATE responses SET status = ?, response = ?, conversation = ?, lease_owner = NULL, "
            f"lease_until = NULL WHERE id = ? AND {_ACTIVE_SQL}"
        )
        with self.db.transaction():
            cursor = self.db.execute(
                sql, (status, _dumps(response), _dumps(conversation), response_id)
            )
            return bool(cursor.rowcount > 0)

    def set_status(self, response_id: str, status: Status, response: dict[str, Any]) -> bool:
        """Move a response between ``queued`` and ``in_progress`` (with its Response object),
        only while it is in one of them: whether it applied."""
        if status not in ACTIVE:
            raise ValueError(f"{status!r} is not queued or in_progress (finish() ends a response)")
        sql = f"UPDATE responses SET status = ?, response = ? WHERE id = ? AND {_ACTIVE_SQL}"
        with self.db.transaction():
            cursor = self.db.execute(sql, (status, _dumps(response), response_id))
            return bool(cursor.rowcount > 0)

    def cancel(
        self, response_id: str, owner: str, now: float | None = None
    ) -> StoredResponse | None:
        """Cancel a ``queued`` or ``in_progress`` response (its Response object's ``status``
        too); the record as it now is (a finished one unchanged), None when missing, expired or
        another key's. The lease stays, so its runner learns of it when it renews."""
        with self.db.transaction():
            record = self._find(response_id, owner, now, lock=True)
            if record is None or record.status not in ACTIVE:
                return record
            cancelled = replace(
                record, status="cancelled", response={**record.response, "status": "cancelled"}
            )
            self.db.execute(
                f"UPDATE responses SET status = ?, response = ? WHERE id = ? AND {_ACTIVE_SQL}",
                ("cancelled", _dumps(cancelled.response), response_id),
            )
            return cancelled

    def claim(
        self, lease_owner: str, lease_s: float, limit: int, now: float | None = None
    ) -> list[StoredResponse]:
        """Lease up to ``limit`` background runs still to finish whose lease is missing or
        lapsed (oldest first) to ``lease_owner`` for ``lease_s``; them, leased. Two claimers
        never get the same run: each lease is taken by an update that re-checks it."""
        now = _now(now)
        pick = (
            f"SELECT id FROM responses WHERE background = 1 AND {_ACTIVE_SQL} AND {_UNLEASED} "
            "AND expires_at >= ? ORDER BY created_at LIMIT ?"
        )
        if self.db.dialect == "postgres":
            pick += " FOR UPDATE SKIP LOCKED"  # concurrent claimers take different runs
        take = (
            "UPDATE responses SET lease_owner = ?, lease_until = ? "
            f"WHERE id = ? AND {_ACTIVE_SQL} AND {_UNLEASED}"
        )
        select = f"SELECT {_COLUMNS} FROM responses WHERE id = ?"
        rows: list[tuple[Any, ...] | None] = []
        with self.db.transaction():
            for (response_id,) in self.db.all(pick, (now, now, int(limit))):
                if self.db.execute(take, (lease_owner, now + lease_s, response_id, now)).rowcount:
                    rows.append(self.db.one(select, (response_id,)))
        return [_record(row) for row in rows if row is not None]

    def renew(
        self, response_id: str, lease_owner: str, lease_s: float, now: float | None = None
    ) -> str | None:
        """Extend ``lease_owner``'s lease by ``lease_s`` from now: the response's status (a
        runner stops on ``cancelled``), or None when the lease is no longer its own (claimed by
        another, released by finish(), or the response deleted)."""
        with self.db.transaction():
            cursor = self.db.execute(
                "UPDATE responses SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                (_now(now) + lease_s, response_id, lease_owner),
            )
            if not cursor.rowcount:
                return None
            row = self.db.one("SELECT status FROM responses WHERE id = ?", (response_id,))
            return str(row[0]) if row is not None else None

    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Delete the responses past their ``expires_at`` (at most ``limit``), EXPIRE_BATCH per
        transaction: how many. The limiter asks for one batch at a time, so the group commits
        on its writer thread go between batches."""
        now, deleted = _now(now), 0
        while True:
            batch = EXPIRE_BATCH if limit is None else min(EXPIRE_BATCH, limit - deleted)
            with self.db.transaction():
                cursor = self.db.execute(
                    "DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                    "WHERE expires_at < ? LIMIT ?)",
                    (now, batch),
                )
                count = max(int(cursor.rowcount), 0)
            deleted += count
            if count < batch or deleted == limit:
                return deleted


def _now(now: float | None) -> float:
    return time.time() if now is None else now
