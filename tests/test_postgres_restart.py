"""A restart of the PostgreSQL server in the middle of a run: every job still finishes.

The shared test server must stay up for everyone else, so these tests make a server of their
own: ``initdb`` into a temporary directory, run on a free port (as the ``postgres`` user when
the tests run as root). Where that cannot be done the tests are skipped, except under
``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import psycopg
import pytest

from flexq import Call, State, StoreError

from ._processes import WorkerProcesses, all_final, all_jobs, read_runs, until, worker_processes_on
from .conftest import make_queue
from .crash_worker import RunLog, register_tasks
from .test_postgres_crash import TENANTS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class PrivateServer:
    """A PostgreSQL server of the tests' own, that they may stop and start at will."""

    bindir: Path
    directory: Path
    port: int
    user: str | None
    """The OS user that runs the server, when it is not the one running the tests (root)."""

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, schema: str) -> str:
        return f"{self.dsn}?schema={schema}"

    def command(self, program: str, *args: str) -> list[str]:
        run_as = ["runuser", "-u", self.user, "--"] if self.user else []
        return [*run_as, str(self.bindir / program), *args]

    def pg_ctl(self, *args: str) -> list[str]:
        data, log = str(self.directory / "data"), str(self.directory / "server.log")
        return self.command("pg_ctl", "-D", data, "-l", log, "-w", "-t", "30", *args)

    async def stop(self) -> None:
        await anyio.run_process(self.pg_ctl("stop", "-m", "fast"))

    async def start(self) -> None:
        await anyio.run_process(self.pg_ctl("start"))

    def postmaster_pid(self) -> int:
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])


def _unavailable(reason: str) -> NoReturn:
    message = f"cannot run a PostgreSQL server of the tests' own: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must run the restart tests)")
    pytest.skip(message)


def _bindir() -> Path | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, check=True)
        bindir = Path(found.stdout.decode().strip())
        if (bindir / "initdb").exists():
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    """A fresh PostgreSQL server (trust auth, no fsync) in a temporary directory."""
    bindir = _bindir()
    if bindir is None:
        _unavailable("no initdb (pg_config --bindir, /usr/lib/postgresql/*/bin)")
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run the server")
    directory = Path(tempfile.mkdtemp(prefix="flexq-pg-"))
    server = PrivateServer(bindir, directory, _free_port(), user)
    try:
        if user is not None:
            shutil.chown(directory, user)
        initdb = server.command(
            "initdb", "-D", str(directory / "data"), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        done = subprocess.run(initdb, capture_output=True, check=False)
        if done.returncode != 0:
            _unavailable(f"initdb failed: {done.stderr.decode(errors='replace')}")
        with (directory / "data" / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {server.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{directory}'\nmax_connections = 60\n"
                "fsync = off\nfull_page_writes = off\nshared_buffers = 16MB\n"
            )
        started = subprocess.run(server.pg_ctl("start"), capture_output=True, check=False)
        if started.returncode != 0:
            log = directory / "server.log"
            _unavailable(f"the server did not start: {log.read_text() if log.exists() else ''}")
        yield server
    finally:
        if (directory / "data" / "postmaster.pid").exists():
            subprocess.run(server.pg_ctl("stop", "-m", "immediate"), capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def private_schema(private_server: PrivateServer) -> Iterator[str]:
    """A schema name of its own on the private server, dropped after the test."""
    schema = "flexq_restart"
    yield schema
    with psycopg.connect(private_server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
async def restart_workers(
    tmp_path: Path,
    private_server: PrivateServer,
    private_schema: str,
    anyio_backend: tuple[str, dict[str, Any]],
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on the private server, on the test's kind of event loop."""
    url = private_server.url(private_schema)
    async with worker_processes_on(url, tmp_path, anyio_backend[0]) as processes:
        yield processes


async def test_jobs_finish_across_a_restart_of_the_server(
    private_server: PrivateServer, restart_workers: WorkerProcesses
) -> None:
    """A queue in this process and two worker processes share 3,000 jobs of 5 tenants; the
    server is stopped for 1.5 s (longer than their 1 s leases) in the middle and started
    again. Nobody crashes, every job ends COMPLETED with its result, and the runs beyond one
    per job are bounded by the jobs the three processes held when the server went away."""
    total, workers = 3_000, 4
    queue = make_queue(restart_workers.url, workers=workers, lease=1.0)
    tasks = register_tasks(queue, RunLog(str(restart_workers.runs)))
    processes = [await restart_workers.start_ready(workers=workers) for _ in range(2)]
    async with queue:
        calls = [
            Call(tasks["work"], n, 0.01).with_options(tenant=f"t{n % TENANTS}")
            for n in range(total)
        ]
        ids = await queue.enqueue_many(calls)

        async def a_third_done() -> bool:
            return sum((await read_runs(restart_workers.runs)).dones.values()) >= total // 3

        await until(a_third_done, 30, "a third of the jobs to be done")
        postmaster = private_server.postmaster_pid()
        await private_server.stop()
        await anyio.sleep(1.5)  # every process's calls fail meanwhile
        done_while_down = sum((await read_runs(restart_workers.runs)).dones.values())
        await private_server.start()

        async def finished() -> bool:
            try:
                return await all_final(queue, total)
            except StoreError:  # the store waits a little before it connects again
                return False

        await until(finished, 60, "every job to be final")
        for process in processes:
            restart_workers.check_alive(process)
        jobs = await all_jobs(queue)
        runs = await read_runs(restart_workers.runs)

    assert private_server.postmaster_pid() != postmaster, "the server was not restarted"
    assert done_while_down < total, "every job was done before the server went away"
    assert sorted(info.id for info in jobs.values()) == sorted(ids), "a job was lost"
    assert {info.state for info in jobs.values()} == {State.COMPLETED}
    assert all(info.result == n for n, info in jobs.items())
    assert [n for n in range(total) if runs.dones[n] < 1] == [], "jobs that never ran to the end"
    extra = sum(count - 1 for count in runs.starts.values() if count > 1)
    # Each process held at most its workers' jobs and the outcomes it had not yet written.
    assert extra <= 3 * 2 * workers, f"{extra} extra runs after one restart"
    for info in jobs.values():
        assert info.attempts == 1 + len(info.errors), info
        assert {error.type for error in info.errors} <= {"flexq.LeaseExpired"}
