"""The service's database: SQLite (embedded, the default) or PostgreSQL (a DSN), one interface.

Keys, usage, holds and stored responses are written with the same SQL on both: ``?``
placeholders (PostgreSQL's driver is given ``%s``), ``INSERT ... ON CONFLICT DO UPDATE``, and
explicit ``BEGIN`` / ``COMMIT`` on a connection in autocommit mode. The schema is the one place
where they differ (:meth:`Database.schema`: types, an identity column, triggers).

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk (the WAL fsynced) before
it returns, so what the limiter acknowledged survives the loss of the process and of the machine
(its disk intact). PostgreSQL commits durably by default (``synchronous_commit=on``). A
connection is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

Dialect = Literal["sqlite", "postgres"]
POSTGRES = re.compile(r"^postgres(ql)?://")
_PARAM = re.compile(r"\?")


def is_dsn(location: str) -> bool:
    """Does ``location`` name a PostgreSQL database (rather than an SQLite file)?"""
    return bool(POSTGRES.match(location))


def describe(location: str) -> str:
    """``location`` for logs and errors: a DSN without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", location)


class Database:
    """One connection to the service's database."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.dialect: Dialect = "postgres" if is_dsn(self.location) else "sqlite"
        self._conn: Any
        if self.dialect == "postgres":
            import psycopg

            self._conn = psycopg.connect(self.location, autocommit=True)
        else:
            path = Path(self.location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.execute("PRAGMA synchronous=FULL")
            with contextlib.suppress(OSError):
                path.chmod(0o600)

    def _sql(self, sql: str) -> str:
        return _PARAM.sub("%s", sql) if self.dialect == "postgres" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the cursor (``fetchone``, ``fetchall``, iteration)."""
        return self._conn.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.dialect == "postgres":
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self._conn.executemany(sql, rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.execute(sql, params).fetchall()]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """One transaction: committed (durably) when the block ends, rolled back on an error.
        SQLite takes its write lock at the start (``BEGIN IMMEDIATE``), so two writers never
        deadlock half way."""
        self._conn.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
        try:
            yield self
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def schema(self, sqlite: str, postgres: str) -> None:
        """Create what is missing: the statements for this dialect, separated by ``;;``."""
        for statement in (sqlite if self.dialect == "sqlite" else postgres).split(";;"):
            if statement.strip():
                self._conn.execute(statement)

    def close(self) -> None:
        self._conn.close()
