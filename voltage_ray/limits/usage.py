"""Durable usage: per key and period counters, and the minute windows, in the key store's database.

The limiter actor is the only writer. It keeps usage in memory and writes the rows that changed
in one transaction (group commit) at least every second and on shutdown, as absolute values, so a
retried or repeated write is harmless. Reservations still outstanding are written too: after a
restart they come back as holds that the late settlements release.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from voltage_ray.limits.quota import MINUTE, KeyState, Usage, Window

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    reserved_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_images INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (key_id, period)
);
CREATE TABLE IF NOT EXISTS rate_windows (
    key_id TEXT PRIMARY KEY,
    requests TEXT NOT NULL,
    tokens TEXT NOT NULL,
    updated_at REAL NOT NULL
);
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


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


def load_usage(conn: sqlite3.Connection, key_id: str, period: str) -> Usage:
    """A key's stored usage for a period; stored reservations come back as orphan holds."""
    row = conn.execute(
        "SELECT requests, tokens, images, reserved_tokens, reserved_images FROM usage "
        "WHERE key_id = ? AND period = ?",
        (key_id, period),
    ).fetchone()
    if row is None:
        return Usage(period)
    requests, tokens, images, reserved_tokens, reserved_images = row
    return Usage(
        period,
        requests=requests,
        tokens=tokens,
        images=images,
        reserved_tokens=reserved_tokens,
        reserved_images=reserved_images,
        orphan_tokens=reserved_tokens,
        orphan_images=reserved_images,
    )


def load_state(conn: sqlite3.Connection, key_id: str, now: float) -> KeyState:
    """A key's minute windows as last written (entries older than a minute drop out)."""
    row = conn.execute(
        "SELECT requests, tokens FROM rate_windows WHERE key_id = ?", (key_id,)
    ).fetchone()
    state = KeyState()
    if row is not None:
        state.requests = Window(MINUTE, (tuple(e) for e in json.loads(row[0])))
        state.tokens = Window(MINUTE, (tuple(e) for e in json.loads(row[1])))
        state.requests.prune(now)
        state.tokens.prune(now)
    return state


@dataclass(frozen=True)
class WindowRow:
    key_id: str
    requests: list[tuple[float, int]]
    tokens: list[tuple[float, int]]


def write(
    conn: sqlite3.Connection,
    usages: Iterable[tuple[str, Usage]],
    windows: Iterable[WindowRow],
    now: float | None = None,
) -> None:
    """Write changed rows in one transaction (the group commit)."""
    now = time.time() if now is None else now
    usage_rows = [
        (
            key_id,
            u.period,
            u.requests,
            u.tokens,
            u.images,
            u.reserved_tokens,
            u.reserved_images,
            now,
        )
        for key_id, u in usages
    ]
    window_rows = [(w.key_id, json.dumps(w.requests), json.dumps(w.tokens), now) for w in windows]
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_UPSERT_USAGE, usage_rows)
        conn.executemany(_UPSERT_WINDOWS, window_rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def period_usage(conn: sqlite3.Connection, period: str) -> dict[str, Usage]:
    """Every key's stored usage in a period (for the `usage` command)."""
    rows = conn.execute(
        "SELECT key_id, requests, tokens, images, reserved_tokens, reserved_images FROM usage "
        "WHERE period = ?",
        (period,),
    ).fetchall()
    return {
        key_id: Usage(period, req, tok, img, rtok, rimg)
        for key_id, req, tok, img, rtok, rimg in rows
    }
