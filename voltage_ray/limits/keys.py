"""The API key store: SQLite, holding only a SHA-256 hash of each key.

A key reads ``vr_<id>_<secret>``. The id is public (it names the key in listings and logs); the
secret never leaves the caller. A lookup finds the row by id, then compares the hash of the
presented key with the stored one using :func:`hmac.compare_digest` (constant time).

Triggers log every change to a key (created, revoked, edited or deleted by any process: the CLI,
the service, plain SQL) in ``key_changes`` under an increasing sequence number, so a reader that
remembers the last number it saw reads only what changed since (:meth:`KeyStore.changes`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PREFIX = "vr"
# vr_ + 12 hex digits (token_hex(6)) + _ + the secret (token_urlsafe(32): 43 characters; older or
# hand-made secrets may differ in length, never in alphabet).
KEY_PATTERN = re.compile(r"vr_([0-9a-f]{12})_[A-Za-z0-9_-]{16,128}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS api_keys_inserted AFTER INSERT ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS api_keys_updated AFTER UPDATE ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS api_keys_deleted AFTER DELETE ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (OLD.id); END;
"""
_COLUMNS = "id, name, plan, created_at, revoked_at, key_hash"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_key(key: str) -> str | None:
    """The public id of a well-formed key, else None (no look-up: shape only)."""
    match = KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    plan: str
    created_at: float
    revoked_at: float | None
    key_hash: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> dict[str, object]:
        """Everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "plan": self.plan,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class KeyUpdate:
    """The keys changed since a reader's change number (every key when ``full``)."""

    source: str  # the database they come from
    seq: int  # the last change they include
    full: bool
    records: tuple[KeyRecord, ...] = ()
    removed: tuple[str, ...] = ()  # ids of deleted keys


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode, shared safely by the service and the CLI."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class KeyStore:
    """Create, list, revoke and verify keys in one SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        self.conn.executescript(_SCHEMA)
        # Change number 1 marks the start of the log (a database from before it included), so
        # a reader at 1 or above reads changes only.
        self.conn.execute(
            "INSERT INTO key_changes (key_id) "
            "SELECT '' WHERE NOT EXISTS (SELECT 1 FROM key_changes)"
        )
        with suppress(OSError):
            self.path.chmod(0o600)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def create(self, plan: str, name: str = "") -> tuple[KeyRecord, str]:
        """Store a new key's hash; return the record and the key (shown once, never stored)."""
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id, name, plan, time.time(), None, hash_key(key))
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO api_keys (id, name, plan, key_hash, created_at) VALUES (?,?,?,?,?)",
                (record.id, record.name, record.plan, record.key_hash, record.created_at),
            )
        return record, key

    def get(self, key_id: str) -> KeyRecord | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()
        return KeyRecord(*row) if row else None

    def changes(self, since: int) -> KeyUpdate:
        """The keys changed after change number ``since``. ``since`` 0, or a number this store
        never reached (another database), reads every key. Hashes included: for verification,
        never for display."""
        # NOTE: the number is read before the rows, so a change racing this read is seen again
        # next time rather than missed (applying a record twice is harmless).
        seq = int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM key_changes").fetchone()[0])
        source = str(self.path)
        if since <= 0 or since > seq:
            rows = self.conn.execute(f"SELECT {_COLUMNS} FROM api_keys").fetchall()
            return KeyUpdate(source, seq, True, tuple(KeyRecord(*row) for row in rows))
        ids = [
            str(row[0])
            for row in self.conn.execute(
                "SELECT DISTINCT key_id FROM key_changes WHERE seq > ?", (since,)
            )
        ]
        records = tuple(r for r in map(self.get, ids) if r is not None)
        found = {r.id for r in records}
        return KeyUpdate(source, seq, False, records, tuple(i for i in ids if i not in found))

    def list(self) -> list[KeyRecord]:
        rows = self.conn.execute(
            "SELECT id, name, plan, created_at, revoked_at FROM api_keys ORDER BY created_at"
        ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])

    def resolve(self, key_or_id: str) -> KeyRecord | None:
        """A record from a full key (verified) or from a key id."""
        key_id = parse_key(key_or_id)
        if key_id is not None:
            record = self.get(key_id)
            if record and hmac.compare_digest(record.key_hash, hash_key(key_or_id)):
                return record
            return None
        return self.get(key_or_id)

    def revoke(self, key_or_id: str) -> KeyRecord | None:
        record = self.resolve(key_or_id)
        if record is None:
            return None
        with self._tx() as tx:
            tx.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (time.time(), record.id),
            )
        return self.get(record.id)

    def verify(self, key_id: str, key_hash: str) -> KeyRecord | None:
        """The live record whose stored hash equals ``key_hash`` (constant-time compare)."""
        record = self.get(key_id)
        if record is None or record.revoked:
            return None
        if not hmac.compare_digest(record.key_hash, key_hash):
            return None
        return record
