"""Shared test settings: this box's Ray environment, set before anything starts Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, server_or_skip

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/vllm_serve (its own Serve app with vLLM's CPU build, and its own Ray cluster) runs
    only when named (``.venv/bin/python -m pytest tests/vllm_serve``, its own step in .ci/run)."""
    if collection_path != HERE / "vllm_serve":
        return None
    where = config.invocation_params.dir
    named = (Path(where, arg.split("::")[0]).resolve() for arg in config.args)
    return None if any(p.is_relative_to(collection_path) for p in named) else True


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (skips without the package, fails in CI)."""
    server = server_or_skip()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The service's database, on both engines: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "v.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database()
