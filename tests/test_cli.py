"""The ``flexq`` command, run as a real subprocess on real SQLite files and PostgreSQL schemas,
and queues that leave migrating to it (``migrate=False``)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING

import anyio
import psycopg
import pytest

import flexq
from flexq._store import _pg_migrations as pg_migrations
from flexq._store import sqlite as sqlite_store
from flexq._store._pg_connections import BlockingConnection, run_blocking
from flexq._store.postgres import PostgresStore

from .conftest import POSTGRES_DSN, make_queue, postgres_url
from .test_batch import _V1_SCHEMA

if TYPE_CHECKING:
    from pathlib import Path

PG_LATEST = pg_migrations.SCHEMA_VERSION
SQLITE_LATEST = sqlite_store.SCHEMA_VERSION


def flexq_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m flexq ARGS`` in a subprocess, without the caller's FLEXQ_URL."""
    environ = {k: v for k, v in os.environ.items() if k != "FLEXQ_URL"}
    return subprocess.run(
        [sys.executable, "-m", "flexq", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
        check=False,
    )


def sql(query: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def pg_versions(schema: str) -> list[object]:
    """The versions recorded in a schema's migrations table."""
    rows = sql(f'SELECT version FROM "{schema}".flexq_migrations ORDER BY version')
    return [row[0] for row in rows]


def schema_exists(schema: str) -> bool:
    return bool(sql("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", schema))


def old_pg_schema(schema: str, version: int) -> None:
    """A schema as the flexq whose last migration was ``version`` left it."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        store = PostgresStore(POSTGRES_DSN, schema=schema)
        run_blocking(store._migrate(BlockingConnection(conn), target=version))


def created(url: str) -> bool:
    """Whether the store of a URL of the ``versioned_url`` fixture exists: a file, a schema."""
    if url.startswith("sqlite:///"):
        return os.path.exists(url.removeprefix("sqlite:///"))
    return schema_exists(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["schema"])


def sqlite_file_schema(path: Path) -> list[tuple[object, ...]]:
    """Everything a SQLite file's schema is made of, and its recorded version."""
    db = sqlite3.connect(path)
    try:
        objects = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        return [*objects, *db.execute("SELECT key, value FROM flexq_meta").fetchall()]
    finally:
        db.close()


# -- SQLite -----------------------------------------------------------------------------------


def test_migrate_creates_a_sqlite_file_then_does_nothing(tmp_path: Path) -> None:
    """--check on a missing file says migrations are pending and creates nothing; migrate
    creates the schema; a second migrate and --check find it up to date."""
    path = tmp_path / "jobs.db"
    url = f"sqlite:///{path}"

    check = flexq_command("migrate", "--check", url)
    assert (check.returncode, check.stderr) == (3, "")
    assert check.stdout == (
        f"{path}: no flexq schema, this flexq's is {SQLITE_LATEST}: migrations pending"
        " (run flexq migrate)\n"
    )
    assert not path.exists()

    first = flexq_command("migrate", url)
    assert (first.returncode, first.stdout, first.stderr) == (
        0,
        f"{path}: created at version {SQLITE_LATEST}\n",
        "",
    )
    again = flexq_command("migrate", url)
    assert (again.returncode, again.stdout) == (0, f"{path}: already at version {SQLITE_LATEST}\n")
    check = flexq_command("migrate", "--check", url)
    assert (check.returncode, check.stdout) == (0, f"{path}: version {SQLITE_LATEST}, up to date\n")


def test_an_old_sqlite_file_is_upgraded(tmp_path: Path) -> None:
    """A file of schema version 1 is reported as behind, then migrated with each step named,
    and gains what the later versions added."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()

    check = flexq_command("migrate", "--check", f"sqlite:///{path}")
    assert check.returncode == 3
    assert f"version 1, this flexq's is {SQLITE_LATEST}" in check.stdout
    migrate = flexq_command("migrate", f"sqlite:///{path}")
    assert migrate.returncode == 0, migrate.stderr
    assert migrate.stdout.splitlines() == [
        f"{path}: version 1 -> {SQLITE_LATEST}",
        *(f"  applied {m.version}: {m.description}" for m in sqlite_store._MIGRATIONS),
    ]
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(flexq_jobs)")}
    db.close()
    assert {"position", "callouts"} <= columns
    assert flexq_command("migrate", "--check", f"sqlite:///{path}").returncode == 0


def test_a_newer_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A file of a newer flexq: migrate and --check exit 4 with one line that says to upgrade,
    and the file is not changed."""
    path = tmp_path / "new.db"
    assert flexq_command("migrate", f"sqlite:///{path}").returncode == 0
    db = sqlite3.connect(path)
    newer = str(SQLITE_LATEST + 1)
    db.execute("UPDATE flexq_meta SET value = ? WHERE key = 'schema_version'", (newer,))
    db.execute("DROP INDEX flexq_jobs_holding")  # a migration would create it again
    db.commit()
    db.close()
    before = sqlite_file_schema(path)

    for args in (["migrate"], ["migrate", "--check"]):
        result = flexq_command(*args, f"sqlite:///{path}")
        assert (result.returncode, result.stdout) == (4, "")
        assert result.stderr == (
            f"flexq: error: {path} has flexq schema version {SQLITE_LATEST + 1}, newer than"
            " this flexq"
            f" understands ({SQLITE_LATEST}): upgrade flexq\n"
        )
    assert sqlite_file_schema(path) == before


# -- PostgreSQL -------------------------------------------------------------------------------


def test_migrate_creates_a_postgres_schema_then_does_nothing(pg_schema: str) -> None:
    """--check on a missing schema creates nothing; migrate applies every migration once and
    names them; a second migrate and --check find the schema up to date."""
    check = flexq_command("migrate", "--check", postgres_url(pg_schema))
    assert (check.returncode, check.stderr) == (3, "")
    assert f"schema '{pg_schema}': no flexq schema" in check.stdout
    assert not schema_exists(pg_schema)

    first = flexq_command("migrate", POSTGRES_DSN, "--schema", pg_schema)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"schema '{pg_schema}': created at version {PG_LATEST}",
        *(f"  applied {m.version}: {m.description}" for m in pg_migrations.MIGRATIONS),
    ]
    assert pg_versions(pg_schema) == [m.version for m in pg_migrations.MIGRATIONS]
    again = flexq_command("migrate", postgres_url(pg_schema))
    assert (again.returncode, again.stdout) == (
        0,
        f"schema '{pg_schema}': already at version {PG_LATEST}\n",
    )
    check = flexq_command("migrate", "--check", postgres_url(pg_schema))
    assert (check.returncode, check.stdout) == (
        0,
        f"schema '{pg_schema}': version {PG_LATEST}, up to date\n",
    )


@pytest.mark.parametrize("version", range(1, PG_LATEST))
def test_an_old_postgres_schema_is_upgraded(pg_schema: str, version: int) -> None:
    """A schema left by an older flexq is reported as behind, then gets exactly the migrations
    it lacks, in order."""
    old_pg_schema(pg_schema, version)
    assert pg_versions(pg_schema) == list(range(1, version + 1))

    check = flexq_command("migrate", "--check", postgres_url(pg_schema))
    assert check.returncode == 3
    assert f"version {version}, this flexq's is {PG_LATEST}" in check.stdout
    migrate = flexq_command("migrate", postgres_url(pg_schema))
    assert migrate.returncode == 0, migrate.stderr
    assert migrate.stdout.splitlines() == [
        f"schema '{pg_schema}': version {version} -> {PG_LATEST}",
        *(
            f"  applied {m.version}: {m.description}"
            for m in pg_migrations.MIGRATIONS
            if m.version > version
        ),
    ]
    assert pg_versions(pg_schema) == list(range(1, PG_LATEST + 1))


def test_a_newer_postgres_schema_is_refused_and_left_alone(pg_schema: str) -> None:
    """A schema of a newer flexq: migrate and --check exit 4 and change nothing."""
    old_pg_schema(pg_schema, 1)
    sql(f"INSERT INTO \"{pg_schema}\".flexq_migrations VALUES (%s, 'future', now())", PG_LATEST + 1)

    for args in (["migrate"], ["migrate", "--check"]):
        result = flexq_command(*args, postgres_url(pg_schema))
        assert (result.returncode, result.stdout) == (4, "")
        assert "newer than this flexq understands" in result.stderr
        assert result.stderr.count("\n") == 1
    assert pg_versions(pg_schema) == [1, PG_LATEST + 1]


def test_processes_that_migrate_at_once_take_turns(pg_schema: str) -> None:
    """Several `flexq migrate` started together wait for the schema's advisory lock and take
    turns: one creates the schema, the others find it done, each migration is applied once."""
    waiting = """
        SELECT count(*) FROM pg_locks AS w JOIN pg_locks AS h
            ON (w.classid, w.objid, w.objsubid) = (h.classid, h.objid, h.objsubid)
        WHERE w.locktype = 'advisory' AND h.locktype = 'advisory' AND NOT w.granted
            AND h.granted AND h.pid = pg_backend_pid()"""
    command = [sys.executable, "-m", "flexq", "migrate", postgres_url(pg_schema)]
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as lock:
        lock.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"flexq.migrate.{pg_schema}",)
        )
        processes = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        deadline = time.monotonic() + 30
        while (row := lock.execute(waiting).fetchone()) is None or row[0] < len(processes):
            assert time.monotonic() < deadline, "the processes did not wait for the lock"
            time.sleep(0.05)
        lock.execute("SELECT pg_advisory_unlock_all()")
        outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, outputs
    heads = sorted(out.splitlines()[0] for out, _ in outputs)
    assert heads == [
        *[f"schema '{pg_schema}': already at version {PG_LATEST}"] * 3,
        f"schema '{pg_schema}': created at version {PG_LATEST}",
    ]
    assert pg_versions(pg_schema) == [m.version for m in pg_migrations.MIGRATIONS]


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "has no schema to migrate"),
        ("mysql://app:hunter2@db/app", "unsupported store URL"),
        ("sqlite:///", "names no file"),
        ("postgresql://app:hunter2@127.0.0.1:1/test", "connection"),
        ("postgresql://app@127.0.0.1/test?schema=Bad-Name", "schema must be"),
    ],
)
def test_a_bad_url_is_one_line_of_error(tmp_path: Path, url: str, message: str) -> None:
    """A URL that names no versioned store, or a server that cannot be reached: exit 1 with one
    line on stderr (no traceback, no password) and nothing on stdout."""
    result = flexq_command("migrate", url)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("flexq: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "hunter2" not in result.stderr


def test_an_error_that_quotes_the_url_masks_its_password() -> None:
    """The URL in an error message is shown with its password replaced by ***."""
    result = flexq_command("migrate", "mysql://app:hunter2@db/app")
    assert result.stderr.startswith("flexq: error: unsupported store URL 'mysql://app:***@db/app'")


def test_a_sqlite_file_that_cannot_be_made_is_an_error(tmp_path: Path) -> None:
    """A SQLite path in a missing directory: exit 1, one line."""
    result = flexq_command("migrate", f"sqlite:///{tmp_path / 'missing' / 'jobs.db'}")
    assert result.returncode == 1
    assert result.stderr.startswith("flexq: error: SQLite store")
    assert result.stderr.count("\n") == 1


def test_without_psycopg_a_postgres_url_says_what_to_install() -> None:
    """Without the postgres extra, a postgresql:// URL is a clear error, not an ImportError."""
    code = (
        "import sys; sys.modules['psycopg'] = None; from flexq._cli import main;"
        f" sys.exit(main(['migrate', {POSTGRES_DSN!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr == (
        "flexq: error: postgresql:// URLs need psycopg: pip install 'flexq[postgres]'\n"
    )


def test_the_url_comes_from_flexq_url_or_is_asked_for(tmp_path: Path) -> None:
    """Without a URL argument, FLEXQ_URL names the store; without either, exit 2 with usage."""
    path = tmp_path / "env.db"
    result = flexq_command("migrate", env={"FLEXQ_URL": f"sqlite:///{path}"})
    created_file = f"{path}: created at version {SQLITE_LATEST}\n"
    assert (result.returncode, result.stdout) == (0, created_file)
    missing = flexq_command("migrate")
    assert missing.returncode == 2
    assert "give the store's URL, or set FLEXQ_URL" in missing.stderr
    assert missing.stderr.startswith("usage: flexq migrate")


def test_schema_goes_with_postgres_urls_only(tmp_path: Path) -> None:
    """--schema on a SQLite URL is refused (exit 1) rather than ignored."""
    result = flexq_command("migrate", f"sqlite:///{tmp_path / 'x.db'}", "--schema", "jobs")
    assert result.returncode == 1
    assert "schema= is for postgresql:// URLs" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_help_explains_the_url_and_the_exit_codes() -> None:
    """`flexq --help` lists the command; `flexq migrate --help` documents FLEXQ_URL and every
    exit code; a missing command is a usage error."""
    top = flexq_command("--help")
    assert top.returncode == 0
    assert "migrate" in top.stdout
    help_text = flexq_command("migrate", "--help")
    assert help_text.returncode == 0
    assert "$FLEXQ_URL" in help_text.stdout
    for code in range(5):
        assert f"\n  {code}  " in help_text.stdout
    assert flexq_command().returncode == 2


# -- queues on migrated schemas ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def versioned_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of each store with a schema version, with nothing in it yet."""
    if request.param == "postgres":
        return postgres_url(request.getfixturevalue("pg_schema"))
    return f"sqlite:///{tmp_path / 'flexq.db'}"


async def test_a_queue_runs_on_a_schema_that_flexq_migrate_made(versioned_url: str) -> None:
    """After `flexq migrate`, a queue with migrate=False opens, enqueues and runs jobs."""
    result = await anyio.to_thread.run_sync(flexq_command, "migrate", versioned_url)
    assert result.returncode == 0, result.stderr
    queue = make_queue(versioned_url, migrate=False)

    @queue.task
    async def double(n: int) -> int:
        return 2 * n

    async with queue:
        job_id = await queue.enqueue(double, 21)
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.result) == (flexq.State.COMPLETED, 42)


async def test_migrate_false_refuses_a_missing_schema_and_creates_nothing(
    versioned_url: str,
) -> None:
    """A queue with migrate=False on a store with no schema fails to open, says to run
    `flexq migrate`, and creates nothing (no file, no schema); a later migrate finds nothing."""
    queue = make_queue(versioned_url, migrate=False)
    with pytest.raises(flexq.SchemaVersionError, match="run `flexq migrate`") as caught:
        await queue.open()
    latest = PG_LATEST if versioned_url.startswith("postgresql") else SQLITE_LATEST
    assert (caught.value.found, caught.value.expected) == (0, latest)
    assert not created(versioned_url)
    result = await anyio.to_thread.run_sync(flexq_command, "migrate", "--check", versioned_url)
    assert result.returncode == 3
    assert "no flexq schema" in result.stdout


async def test_migrate_false_refuses_an_older_sqlite_file(tmp_path: Path) -> None:
    """A queue with migrate=False leaves a version 1 file as it is and says so."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()
    before = sqlite_file_schema(path)
    queue = make_queue(f"sqlite:///{path}", migrate=False)
    with pytest.raises(flexq.SchemaVersionError, match="is at flexq schema version 1") as caught:
        await queue.open()
    assert (caught.value.found, caught.value.expected) == (1, SQLITE_LATEST)
    assert sqlite_file_schema(path) == before


async def test_a_dependant_left_by_an_older_flexq_is_released_after_the_upgrade(
    pg_schema: str,
) -> None:
    """Version 4 marks the jobs that others depend on, and reports of unmarked jobs skip the
    work of releasing dependants: the migration marks the parents of the dependencies that a
    version 3 flexq left, so a dependant that waits on such a parent still runs."""
    old_pg_schema(pg_schema, 3)
    columns = (
        "id, task, kind, kind_rank, tenant, priority, state, args, kwargs, max_attempts,"
        " created_at, run_at"
    )
    for job_id, task, state in (("parent", "first", "QUEUED"), ("child", "then", "WAITING")):
        sql(
            f'INSERT INTO "{pg_schema}".flexq_jobs ({columns})'
            " VALUES (%s, %s, 'queueable', 1, 'acme', 0, %s, '[]', '{}', 1, 0, 0)",
            job_id,
            task,
            state,
        )
    sql(f"INSERT INTO \"{pg_schema}\".flexq_dependencies VALUES ('parent', 'child', 'abort')")
    queue = make_queue(postgres_url(pg_schema))
    ran: list[str] = []

    @queue.task(name="first")
    async def first() -> None:
        ran.append("first")

    @queue.task(name="then")
    async def then() -> None:
        ran.append("then")

    async with queue:
        info = await queue.wait("child", timeout=10)
    assert info.state is flexq.State.COMPLETED
    assert ran == ["first", "then"]


async def test_migrate_false_refuses_an_older_postgres_schema(pg_schema: str) -> None:
    """A queue with migrate=False does not migrate an older schema; a default queue does."""
    old_pg_schema(pg_schema, 1)
    queue = make_queue(postgres_url(pg_schema), migrate=False)
    with pytest.raises(flexq.SchemaVersionError, match="is at flexq schema version 1"):
        await queue.open()
    assert pg_versions(pg_schema) == [1]
    migrating = make_queue(postgres_url(pg_schema))
    await migrating.open()
    await migrating.close()
    assert pg_versions(pg_schema) == list(range(1, PG_LATEST + 1))


async def test_a_newer_schema_is_refused_on_open_with_the_same_error(tmp_path: Path) -> None:
    """Opening a newer file raises SchemaVersionError, with or without migrate."""
    path = tmp_path / "new.db"
    assert (
        await anyio.to_thread.run_sync(flexq_command, "migrate", f"sqlite:///{path}")
    ).returncode == 0
    db = sqlite3.connect(path)
    newer = str(SQLITE_LATEST + 1)
    db.execute("UPDATE flexq_meta SET value = ? WHERE key = 'schema_version'", (newer,))
    db.commit()
    db.close()
    for migrate in (True, False):
        queue = make_queue(f"sqlite:///{path}", migrate=migrate)
        with pytest.raises(flexq.SchemaVersionError, match="upgrade flexq") as caught:
            await queue.open()
        assert caught.value.found == SQLITE_LATEST + 1


def test_migrate_false_goes_with_a_url() -> None:
    """migrate=False is an option of the stores a URL makes, not of a Store object."""
    store = flexq.Queue("memory://").store
    with pytest.raises(flexq.InvalidArguments, match="migrate="):
        flexq.Queue(store, migrate=False)
