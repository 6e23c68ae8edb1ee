"""The API key store: the service's database (SQLite or PostgreSQL, ``limits/db.py``), holding
only a SHA-256 hash of each key.

A key reads ``vr_<id>_<secret>``. The id is public (it names the key in listings and logs); the
secret never leaves the caller. A lookup finds the row by id, then compares the hash of the
presented key with the stored one using :func:`hmac.compare_digest` (constant time).

Triggers log every change to a key (created, revoked, edited or deleted by any process: the CLI,
the service, plain SQL) in ``key_changes`` under an increasing sequence number, so a reader that
remembers the last number it saw reads only what changed since (:meth:`KeyStore.changes`). On
PostgreSQL the trigger first takes a transaction-wide advisory lock, so the numbers are given in
commit order (a sequence alone can commit 11 before 10, and a reader at 11 would never see 10).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from voltage_ray.limits.db import Database

PREFIX = "vr"
# vr_ + 12 hex digits (token_hex(6)) + _ + the secret (token_urlsafe(32): 43 characters; older or
# hand-made secrets may differ in length, never in alphabet).
KEY_PATTERN = re.compile(r"vr_([0-9a-f]{12})_[A-Za-z0-9_-]{16,128}")

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);;
CREATE TABLE IF NOT EXISTS key_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL
);;
CREATE TRIGGER IF NOT EXISTS api_keys_inserted AFTER INSERT ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;;
CREATE TRIGGER IF NOT EXISTS api_keys_updated AFTER UPDATE ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;;
CREATE TRIGGER IF NOT EXISTS api_keys_deleted AFTER DELETE ON api_keys
BEGIN INSERT INTO key_changes (key_id) VALUES (OLD.id); END;;
"""
_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);;
CREATE TABLE IF NOT EXISTS key_changes (
    seq BIGSERIAL PRIMARY KEY,
    key_id TEXT NOT NULL
);;
CREATE OR REPLACE FUNCTION voltage_key_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7370011);
    IF TG_OP = 'DELETE' THEN
        INSERT INTO key_changes (key_id) VALUES (OLD.id);
        RETURN OLD;
    END IF;
    INSERT INTO key_changes (key_id) VALUES (NEW.id);
    RETURN NEW;
END $$ LANGUAGE plpgsql;;
CREATE OR REPLACE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
FOR EACH ROW EXECUTE FUNCTION voltage_key_changed();;
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


class KeyStore:
    """Create, list, revoke and verify keys in the service's database (a path or a DSN)."""

    def __init__(self, location: str | Path) -> None:
        self.db = Database(location)
        self.path = self.db.location  # the database's identity, for key-change readers
        with self.db.transaction() as db:
            if db.dialect == "postgres":  # two processes creating the schema at once
                db.execute("SELECT pg_advisory_xact_lock(7370010)")
            db.schema(_SQLITE_SCHEMA, _POSTGRES_SCHEMA)
            # Change number 1 marks the start of the log (a database from before it
            # included), so a reader at 1 or above reads changes only.
            db.execute(
                "INSERT INTO key_changes (key_id) "
                "SELECT '' WHERE NOT EXISTS (SELECT 1 FROM key_changes)"
            )

    def close(self) -> None:
        self.db.close()

    def create(self, plan: str, name: str = "") -> tuple[KeyRecord, str]:
        """Store a new key's hash; return the record and the key (shown once, never stored)."""
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id, name, plan, time.time(), None, hash_key(key))
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO api_keys (id, name, plan, key_hash, created_at) VALUES (?,?,?,?,?)",
                (record.id, record.name, record.plan, record.key_hash, record.created_at),
            )
        return record, key

    def get(self, key_id: str) -> KeyRecord | None:
        row = self.db.one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return KeyRecord(*row) if row else None

    def changes(self, since: int) -> KeyUpdate:
        """The keys changed after change number ``since``. ``since`` 0, or a number this store
        never reached (another database), reads every key. Hashes included: for verification,
        never for display."""
        # NOTE: the number is read before the rows, so a change racing this read is seen again
        # next time rather than missed (applying a record twice is harmless).
        found_seq = self.db.one("SELECT COALESCE(MAX(seq), 0) FROM key_changes")
        seq = int(found_seq[0]) if found_seq else 0
        source = self.path
        if since <= 0 or since > seq:
            rows = self.db.all(f"SELECT {_COLUMNS} FROM api_keys")
            return KeyUpdate(source, seq, True, tuple(KeyRecord(*row) for row in rows))
        ids = [
            str(row[0])
            for row in self.db.all(
                "SELECT key_id FROM key_changes WHERE seq > ? GROUP BY key_id ORDER BY MIN(seq)",
                (since,),
            )
        ]
        records = tuple(r for r in map(self.get, ids) if r is not None)
        found = {r.id for r in records}
        return KeyUpdate(source, seq, False, records, tuple(i for i in ids if i not in found))

    def list(self) -> list[KeyRecord]:
        rows = self.db.all(
            "SELECT id, name, plan, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [KeyRecord(*row) for row in rows]

    def count(self) -> int:
        row = self.db.one("SELECT COUNT(*) FROM api_keys")
        return int(row[0]) if row else 0

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
        with self.db.transaction() as tx:
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
