"""The API key store: SQLite, holding only a SHA-256 hash of each key.

A key reads ``vr_<id>_<secret>``. The id is public (it names the key in listings and logs); the
secret never leaves the caller. A lookup finds the row by id, then compares the hash of the
presented key with the stored one using :func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PREFIX = "vr"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_key(key: str) -> str | None:
    """The public id of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1]


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
            "SELECT id, name, plan, created_at, revoked_at, key_hash FROM api_keys WHERE id = ?",
            (key_id,),
        ).fetchone()
        return KeyRecord(*row) if row else None

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
