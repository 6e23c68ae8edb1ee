"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` package (``.ci/run``
installs it), a cluster in a temporary directory, on a free port of the loopback, trusted local
logins, stopped at the end of the session.

PostgreSQL refuses to run as root: as root (CI), the server runs as the package's ``postgres``
user. Without the package the tests that need it skip, unless ``CI`` is set: there a missing
server is a failure, not a silent skip (as ``tests/integration/test_docs.py`` does with Chromium).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

INSTALL = "apt-get install -y postgresql"


def binaries() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian keeps them out of PATH)."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(found) / "initdb").exists():
            return Path(found)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster: ``start()``, then ``database()`` for a fresh database's DSN."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="voltage-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, cwd=self.root)

    def start(self) -> None:
        assert self.bin is not None
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.root / "server.log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def server_or_skip() -> PostgresServer:
    server = PostgresServer()
    if server.bin is None:
        reason = f"PostgreSQL is not installed (Debian: {INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run these tests")
        pytest.skip(reason)
    server.start()
    return server
