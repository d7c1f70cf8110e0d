"""Shared fixtures: every test runs under asyncio (debug) and trio, on every store."""

from __future__ import annotations

import logging
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import structlog

import flexq
from flexq.abc import Store

from ._processes import WorkerProcesses, worker_processes_on

if TYPE_CHECKING:
    from pathlib import Path

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Both event loops: asyncio in debug mode, and trio."""
    return request.param  # type: ignore[no-any-return]


StoreFactory = Callable[[], Store]


POSTGRES_DSN = os.environ.get(
    "FLEXQ_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name in the test database, dropped (with its tables) after the test."""
    import psycopg

    schema = f"flexq_test_{uuid.uuid4().hex[:16]}"
    try:
        yield schema
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def postgres_url(schema: str) -> str:
    """The test database's URL, with flexq's tables in ``schema``."""
    parsed = urllib.parse.urlsplit(POSTGRES_DSN)
    query = [*urllib.parse.parse_qsl(parsed.query), ("schema", schema)]
    return parsed._replace(query=urllib.parse.urlencode(query)).geturl()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes fresh stores of one kind (each call a new store; SQLite ones share one file,
    PostgreSQL ones one schema)."""
    path = tmp_path / "flexq.db"
    if request.param == "memory":
        return flexq_memory_store
    if request.param == "postgres":
        schema: str = request.getfixturevalue("pg_schema")
        return lambda: postgres_store(schema)
    return lambda: sqlite_store(path)


def flexq_memory_store() -> Store:
    from flexq._store.memory import MemoryStore

    return MemoryStore()


def sqlite_store(path: Path) -> Store:
    from flexq._store.sqlite import SQLiteStore

    return SQLiteStore(str(path))


def postgres_store(schema: str) -> Store:
    from flexq._store.postgres import PostgresStore

    return PostgresStore(POSTGRES_DSN, schema=schema)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite URL in the test's own directory."""
    return f"sqlite:///{tmp_path / 'flexq.db'}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store a Queue can be made from."""
    if request.param == "memory":
        return "memory://"
    if request.param == "postgres":
        return postgres_url(request.getfixturevalue("pg_schema"))
    return f"sqlite:///{tmp_path / 'flexq.db'}"


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    """An open store of each kind."""
    opened = store_factory()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def make_queue(url: str | Store, **options: Any) -> flexq.Queue:
    """A queue with test-friendly timings."""
    options.setdefault("workers", 4)
    options.setdefault("poll_interval", 0.05)
    options.setdefault("backoff", flexq.Backoff(base=0.01, maximum=0.05, jitter=0.0))
    options.setdefault("grace_period", 2.0)
    options.setdefault("max_loop_lag", None)
    return flexq.Queue(url, **options)


@pytest.fixture
async def worker_processes(
    tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on a SQLite file of the test's own, on the test's kind of event loop,
    killed when it ends."""
    url = f"sqlite:///{tmp_path / 'flexq.db'}"
    async with worker_processes_on(url, tmp_path, anyio_backend[0]) as processes:
        yield processes


@pytest.fixture
async def pg_workers(
    tmp_path: Path, pg_schema: str, anyio_backend: tuple[str, dict[str, Any]]
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on the test's PostgreSQL schema, on the test's kind of event loop."""
    async with worker_processes_on(postgres_url(pg_schema), tmp_path, anyio_backend[0]) as found:
        yield found


@pytest.fixture(params=["postgres", "sqlite"])
async def store_workers(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on a PostgreSQL schema, or on a SQLite file, of the test's own."""
    if request.param == "postgres":
        url = postgres_url(request.getfixturevalue("pg_schema"))
    else:
        url = f"sqlite:///{tmp_path / 'flexq.db'}"
    async with worker_processes_on(url, tmp_path, anyio_backend[0]) as processes:
        yield processes
