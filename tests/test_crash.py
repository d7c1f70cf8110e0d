"""Crash safety: killed workers, several worker processes on one file, graceful shutdown.

Worker processes are real children (``tests/crash_worker.py``) on a SQLite file in the test's
directory; the test process only enqueues and queries (``queue.open()``, no workers). Every
task run appends ``start``/``done`` lines to a shared run log, so runs can be counted per job
and per process. Each child's output goes to its own file, printed when the test ends (pytest
shows it for failing tests).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import flexq
from flexq import Call, JobInfo, State

from .crash_worker import LEASE, RunLog, register_batch, register_tasks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import Process

    from .conftest import StoreFactory

WORKER_SCRIPT = Path(__file__).with_name("crash_worker.py")


@dataclasses.dataclass(frozen=True)
class Runs:
    """What the run log says: how often each job started and finished, and in which process."""

    starts: collections.Counter[int]
    dones: collections.Counter[int]
    ready: tuple[int, ...]
    """Pids of the worker processes that came up, in order."""
    pids_by_job: dict[int, list[int]]
    """The processes that started each job."""
    chunks: collections.Counter[int]
    """How often each chunk of the crash batch ran."""
    batch_events: collections.Counter[str]
    """How often the crash batch's start and finish ran."""

    @property
    def working_pids(self) -> set[int]:
        return {pid for pids in self.pids_by_job.values() for pid in pids}


async def read_runs(path: Path) -> Runs:
    starts: collections.Counter[int] = collections.Counter()
    dones: collections.Counter[int] = collections.Counter()
    ready: list[int] = []
    pids_by_job: dict[int, list[int]] = collections.defaultdict(list)
    chunks: collections.Counter[int] = collections.Counter()
    batch_events: collections.Counter[str] = collections.Counter()
    apath = anyio.Path(path)
    text = await apath.read_text() if await apath.exists() else ""
    for line in text.splitlines():
        match line.split():
            case ["ready", pid]:
                ready.append(int(pid))
            case ["start", n, pid]:
                starts[int(n)] += 1
                pids_by_job[int(n)].append(int(pid))
            case ["done", n, _]:
                dones[int(n)] += 1
            case ["chunk", n, _]:
                chunks[int(n)] += 1
            case ["batch-start" | "batch-finish" as event, _]:
                batch_events[event] += 1
            case _:
                pytest.fail(f"torn or unknown line in the run log: {line!r}")
    return Runs(starts, dones, tuple(ready), dict(pids_by_job), chunks, batch_events)


class WorkerProcesses:
    """Starts crash_worker.py children on one database and kills them all at the end."""

    def __init__(self, directory: Path, backend: str) -> None:
        self.db = directory / "flexq.db"
        self.runs = directory / "runs.log"
        self.backend = backend
        self._directory = directory
        self._started: list[tuple[Process, Path]] = []

    async def start(self, *, workers: int = 4) -> Process:
        output = self._directory / f"worker-{len(self._started)}.out"
        command = [
            sys.executable, str(WORKER_SCRIPT), str(self.db), str(self.runs), self.backend,
            "--workers", str(workers),
        ]  # fmt: skip
        with output.open("wb") as sink:  # the child keeps its own copy of the descriptor
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._started.append((process, output))
        return process

    async def start_ready(self, *, workers: int = 4, timeout: float = 15.0) -> Process:
        """Start a worker and wait until its queue is open and working."""
        process = await self.start(workers=workers)

        async def is_ready() -> bool:
            self.check_alive(process)
            return process.pid in (await read_runs(self.runs)).ready

        await until(is_ready, timeout, f"worker {process.pid} to come up")
        return process

    def check_alive(self, process: Process) -> None:
        if process.returncode is not None:
            pytest.fail(f"worker {process.pid} exited with {process.returncode}: see its output")

    @staticmethod
    async def kill(process: Process) -> None:
        """SIGKILL the worker and reap it."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await process.wait()

    async def close(self) -> None:
        for process, output in self._started:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await self.kill(process)
                await process.aclose()
            text = await anyio.Path(output).read_text(errors="replace")
            print(f"--- worker {process.pid} (exit {process.returncode}), {output} ---\n{text}")


@pytest.fixture
async def worker_processes(
    tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on the same event loop kind as the test, killed when it ends."""
    processes = WorkerProcesses(tmp_path, anyio_backend[0])
    try:
        yield processes
    finally:
        await processes.close()


@contextlib.asynccontextmanager
async def producer(db: Path) -> AsyncIterator[tuple[flexq.Queue, dict[str, flexq.Task[Any]]]]:
    """A queue that only enqueues and queries (no workers), with the crash tasks registered."""
    queue = flexq.Queue(f"sqlite:///{db}", poll_interval=0.05)
    tasks = register_tasks(queue, RunLog(os.devnull))
    register_batch(queue, RunLog(os.devnull))
    await queue.open()
    try:
        yield queue, tasks
    finally:
        await queue.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; fail the test after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        # Another process changes what we wait for: nothing here can signal us, so poll.
        while True:
            if await check():
                return
            await anyio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def all_jobs(queue: flexq.Queue) -> dict[int, JobInfo]:
    """Every job in the store, by its first argument (the ``n`` the tests give each job)."""
    found: dict[int, JobInfo] = {}
    cursor: str | None = None
    while True:
        page = await queue.jobs(limit=1000, cursor=cursor)
        for info in page.items:
            assert info.args[0] not in found, f"two jobs with argument {info.args[0]}"
            found[info.args[0]] = info
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def all_final(queue: flexq.Queue, total: int) -> bool:
    counts = await queue.counts()
    return sum(counts[state] for state in State if state.is_final) >= total


def work_calls(task: flexq.Task[Any], count: int, *, start: int = 0) -> list[Call]:
    """``count`` jobs that each sleep 10-20 ms; job ``n`` gets the argument ``n``."""
    return [Call(task, n, 0.010 + (n % 11) / 1000) for n in range(start, start + count)]


@pytest.mark.slow
async def test_sigkill_mid_run_loses_no_job(worker_processes: WorkerProcesses) -> None:
    """After a worker process is SIGKILLed mid-run, a new one completes every job, re-running
    only the jobs that the dead one held."""
    total, workers = 300, 4
    async with producer(worker_processes.db) as (queue, tasks):
        ids = await queue.enqueue_many(work_calls(tasks["work"], total))
        first = await worker_processes.start(workers=workers)

        async def some_done() -> bool:
            worker_processes.check_alive(first)
            return len((await read_runs(worker_processes.runs)).dones) >= 60

        await until(some_done, 15, "the first worker to complete 60 jobs")
        await worker_processes.kill(first)
        assert first.returncode == -signal.SIGKILL

        # The dead process can change nothing now: this is the state the crash left.
        at_kill = await read_runs(worker_processes.runs)
        held = {info.args[0]: info for info in (await queue.jobs(state=State.PROCESSING)).items}
        assert held, "the kill interrupted no job: kill earlier or make jobs longer"
        assert any(at_kill.starts[n] > at_kill.dones[n] for n in held), (
            "no handler was mid-run at the kill"
        )
        # A process holds at most `workers` running jobs plus those whose outcome its
        # reporter has not written yet (a worker takes its next job without waiting for that).
        assert len(held) <= 2 * workers, f"the dead worker held {len(held)} jobs"
        completed_before = await queue.counts()
        assert 0 < completed_before[State.COMPLETED] < total

        started = time.monotonic()
        await worker_processes.start(workers=workers)
        await until(lambda: all_final(queue, total), 20, "every job to be final")
        recovery = time.monotonic() - started
        jobs = await all_jobs(queue)
        runs = await read_runs(worker_processes.runs)

    assert sorted(info.id for info in jobs.values()) == sorted(ids), "a job was lost"
    assert {info.state for info in jobs.values()} == {State.COMPLETED}
    assert [n for n in range(total) if runs.dones[n] < 1] == [], "jobs that never ran to the end"
    rerun = {n for n in range(total) if runs.starts[n] > 1}
    assert rerun <= set(held), "a job the dead worker did not hold ran twice"
    for n, info in jobs.items():
        assert info.result == n
        if n in held:
            # Its lease expired: one attempt counted for the dead worker, one for the new one.
            assert info.attempts == 2, info
            assert [error.type for error in info.errors] == ["flexq.LeaseExpired"]
            assert runs.starts[n] <= 2
        else:
            assert info.attempts == 1, info
            assert info.errors == ()
            assert runs.starts[n] == 1
    # Recovery comes within a lease and a recovery pass, not hours later.
    assert recovery < 10 * LEASE


@pytest.mark.slow
async def test_two_worker_processes_share_one_file_without_duplicates(
    worker_processes: WorkerProcesses,
) -> None:
    """Two live worker processes on one SQLite file run each of 500 jobs exactly once, even
    jobs that run longer than the lease."""
    short, long = 500, 4
    total = short + long
    async with producer(worker_processes.db) as (queue, tasks):
        first = await worker_processes.start_ready(workers=4)
        second = await worker_processes.start_ready(workers=4)
        # Without lease renewal the other process would take these over and run them again.
        long_calls = [Call(tasks["work"], n, 2.5 * LEASE) for n in range(short, total)]
        ids = await queue.enqueue_many(long_calls + work_calls(tasks["work"], short))

        async def done() -> bool:
            worker_processes.check_alive(first)
            worker_processes.check_alive(second)
            return await all_final(queue, total)

        await until(done, 20, "every job to be final")
        jobs = await all_jobs(queue)
        runs = await read_runs(worker_processes.runs)

    assert sorted(info.id for info in jobs.values()) == sorted(ids)
    assert {info.state for info in jobs.values()} == {State.COMPLETED}
    assert {info.attempts for info in jobs.values()} == {1}
    duplicated = {n: pids for n, pids in runs.pids_by_job.items() if len(pids) != 1}
    assert duplicated == {}, "jobs that ran more than once"
    assert set(runs.starts) == set(range(total))
    assert runs.dones == runs.starts
    assert runs.working_pids == {first.pid, second.pid}, "both processes should have worked"


@pytest.mark.slow
async def test_worker_process_finds_jobs_another_process_enqueues(
    worker_processes: WorkerProcesses,
) -> None:
    """Jobs that a producer-only process enqueues are found by a running worker's poll."""
    async with producer(worker_processes.db) as (queue, tasks):
        worker = await worker_processes.start_ready(workers=4)
        latencies: list[float] = []
        for wave in range(5):
            ids = await queue.enqueue_many(work_calls(tasks["work"], 20, start=wave * 20))
            for job_id in ids:
                info = await queue.wait(job_id, timeout=10)
                assert info.state is State.COMPLETED, info
                assert info.started_at is not None
                latencies.append((info.started_at - info.created_at).total_seconds())
            worker_processes.check_alive(worker)
            await anyio.sleep(0.2)  # the worker goes idle: the next wave must be polled for
        runs = await read_runs(worker_processes.runs)

    assert runs.starts == collections.Counter(range(100))
    assert runs.working_pids == {worker.pid}
    # poll_interval is 0.05 s; jobs wait for a free worker too, but never for long.
    assert max(latencies) < 2.0, latencies


MAX_LEASE_EXPIRIES = 3  # the Queue's default, which crash_worker.py keeps


@dataclasses.dataclass(frozen=True)
class PoisonRun:
    deaths: int
    poison: JobInfo
    others: dict[int, JobInfo]
    runs: Runs


async def run_poison(worker_processes: WorkerProcesses, *, workers: int) -> PoisonRun:
    """Enqueue a poison pill (job 0) then 20 plain jobs, and restart every worker that dies
    until all are final."""
    others = 20
    async with producer(worker_processes.db) as (queue, tasks):
        poison_id = await queue.enqueue(tasks["poison"], 0)
        await queue.enqueue_many(work_calls(tasks["work"], others, start=1))
        process = await worker_processes.start(workers=workers)
        deaths = 0

        async def done_or_dead() -> bool:
            return process.returncode is not None or await all_final(queue, others + 1)

        with anyio.fail_after(20):
            while True:
                await until(done_or_dead, 20, "a worker to die or every job to be final")
                if process.returncode is None:
                    break
                assert process.returncode == -signal.SIGKILL
                deaths += 1
                assert deaths <= MAX_LEASE_EXPIRIES, "the poison ran after it should have failed"
                process = await worker_processes.start(workers=workers)
        poison = await queue.get(poison_id)
        jobs = await all_jobs(queue)
        runs = await read_runs(worker_processes.runs)
    del jobs[0]
    return PoisonRun(deaths, poison, jobs, runs)


@pytest.mark.slow
async def test_poison_pill_fails_after_max_lease_expiries(
    worker_processes: WorkerProcesses,
) -> None:
    """A job that kills its worker process each time ends FAILED with flexq.LeaseExpired after
    max_lease_expiries (3) deaths, while the other jobs complete."""
    # One worker per process, so that the poison takes no other running job down with it.
    run = await run_poison(worker_processes, workers=1)

    assert run.deaths == MAX_LEASE_EXPIRIES
    assert run.runs.starts[0] == MAX_LEASE_EXPIRIES
    poison = run.poison
    assert poison.state is State.FAILED, poison
    assert poison.attempts == MAX_LEASE_EXPIRIES
    assert poison.error is not None
    assert poison.error.type == "flexq.LeaseExpired"
    assert [error.type for error in poison.errors] == ["flexq.LeaseExpired"] * MAX_LEASE_EXPIRIES
    assert f"{MAX_LEASE_EXPIRIES} of at most {MAX_LEASE_EXPIRIES}" in poison.error.message
    for n, info in run.others.items():
        assert (info.state, info.result) == (State.COMPLETED, n), info


@pytest.mark.slow
async def test_poison_pill_does_not_fail_the_jobs_that_ran_beside_it(
    worker_processes: WorkerProcesses,
) -> None:
    """With several workers per process, the jobs that died beside a poison pill still end
    COMPLETED; only the poison ends FAILED."""
    run = await run_poison(worker_processes, workers=4)

    assert run.poison.state is State.FAILED, run.poison
    assert run.deaths == MAX_LEASE_EXPIRIES
    failed = {n: info.attempts for n, info in run.others.items() if info.state is State.FAILED}
    assert failed == {}, "innocent jobs failed beside the poison (job: attempts)"


async def test_shutdown_releases_jobs_that_outlive_the_grace_period(
    store_factory: StoreFactory,
) -> None:
    """Leaving `async with queue` lets jobs finish within grace_period and returns the others to
    QUEUED with no attempt counted; a later queue completes them."""
    store = store_factory()
    grace_period = 0.5
    queue = flexq.Queue(
        store, workers=4, grace_period=grace_period, poll_interval=0.05, max_loop_lag=None
    )
    started: set[int] = set()
    all_started = anyio.Event()
    cancelled: set[int] = set()

    @queue.task(name="crash.shutdown")
    async def job(n: int, duration: float) -> int:
        started.add(n)
        if len(started) == 4:
            all_started.set()
        try:
            await anyio.sleep(duration)
        except anyio.get_cancelled_exc_class():
            cancelled.add(n)
            raise
        return n

    async with queue:
        quick = [await queue.enqueue(job, n, 0.2) for n in (0, 1)]
        slow = [await queue.enqueue(job, n, 60.0) for n in (2, 3)]
        with anyio.fail_after(5):
            await all_started.wait()
        leaving = anyio.current_time()
    elapsed = anyio.current_time() - leaving

    assert cancelled == {2, 3}
    assert grace_period <= elapsed < grace_period + 1.0, elapsed
    later = flexq.Queue(store, workers=4, poll_interval=0.05, max_loop_lag=None)

    @later.task(name="crash.shutdown")
    async def fast_job(n: int, duration: float) -> int:
        return n

    await later.open()
    try:
        for job_id in quick:
            info = await later.get(job_id)
            assert (info.state, info.attempts, info.errors) == (State.COMPLETED, 1, ()), info
        for job_id in slow:
            info = await later.get(job_id)
            assert (info.state, info.attempts, info.errors) == (State.QUEUED, 0, ()), info
            assert info.finished_at is None
    finally:
        await later.close()

    async with later:
        for n, job_id in zip((2, 3), slow, strict=True):
            info = await later.wait(job_id, timeout=5)
            assert (info.state, info.attempts, info.result) == (State.COMPLETED, 1, n), info


@pytest.mark.slow
async def test_sigkill_mid_batch_resumes_from_the_first_uncommitted_chunk(
    worker_processes: WorkerProcesses,
) -> None:
    """A batch whose process is SIGKILLed while it processes chunks resumes in a new process:
    ``start`` does not run again, no chunk checkpointed before the kill runs again, every chunk
    runs, and ``finish`` runs once."""
    chunks = 60
    async with producer(worker_processes.db) as (queue, tasks):
        job_id = await queue.enqueue("crash.batch", chunks, 0.05, tenant="acme")
        worker = await worker_processes.start_ready()

        async def some_chunks_ran() -> bool:
            return len((await read_runs(worker_processes.runs)).chunks) >= 20

        await until(some_chunks_ran, 30, "20 chunks to run")
        await worker_processes.kill(worker)
        pending = await queue.store.pending_chunks(job_id, -1, chunks)
        committed = set(range(chunks)) - {index for index, _ in pending}
        assert len(committed) >= 10, "the checkpoints of the chunks that ran were written"
        assert pending, "the kill came before the last chunk"

        await worker_processes.start_ready()

        async def resumed() -> bool:
            info = await queue.get(job_id)
            return info.state is State.PROCESSING and info.attempts == 2

        await until(resumed, 30, "the batch to resume in the new process")
        # It runs alone only until its first checkpoint: other jobs run beside it then.
        beside = await queue.enqueue(tasks["work"], 1000, 0.0)
        assert (await queue.wait(beside, timeout=30)).state is State.COMPLETED
        assert not (await queue.get(job_id)).is_final
        info = await queue.wait(job_id, timeout=60)
    runs = await read_runs(worker_processes.runs)
    assert info.state is State.COMPLETED, info.errors
    assert runs.batch_events == {"batch-start": 1, "batch-finish": 1}
    assert set(runs.chunks) == set(range(chunks))
    assert all(runs.chunks[index] == 1 for index in committed), "a committed chunk ran again"
    assert info.progress == flexq.BatchProgress(chunks, chunks, 0, chunks, chunks, 0)
    assert info.errors[-1].type == "flexq.LeaseExpired"


@pytest.mark.slow
async def test_sigkill_during_start_runs_start_again_without_duplicate_items(
    worker_processes: WorkerProcesses,
) -> None:
    """A batch killed while ``start`` streams its items (some already written) runs ``start``
    again from scratch: the items of the dead attempt are dropped, none is lost or doubled."""
    items = 120
    async with producer(worker_processes.db) as (queue, _):
        job_id = await queue.enqueue("crash.slow-start", items, 0.02, tenant="acme")
        worker = await worker_processes.start_ready()

        async def some_chunks_written() -> bool:
            return bool(await queue.store.pending_chunks(job_id, -1, 1))

        await until(some_chunks_written, 30, "start to write its first chunks")
        assert (await queue.get(job_id)).state is State.PREPARING
        await worker_processes.kill(worker)
        await worker_processes.start_ready()
        info = await queue.wait(job_id, timeout=60)
    runs = await read_runs(worker_processes.runs)
    assert info.state is State.COMPLETED, info.errors
    assert runs.batch_events == {"batch-start": 2, "batch-finish": 1}
    assert runs.chunks == dict.fromkeys(range(items), 1)
    assert info.progress == flexq.BatchProgress(items, items, 0, items, items, 0)


@pytest.mark.slow
async def test_a_killed_worker_process_stays_listed_but_not_alive(
    worker_processes: WorkerProcesses,
) -> None:
    """queue.workers() shows worker processes with their pid; one that was SIGKILLed is no
    longer alive once two leases passed without its heartbeat."""
    async with producer(worker_processes.db) as (queue, _):
        worker = await worker_processes.start_ready()
        (listed,) = await queue.workers()
        assert (listed.pid, listed.alive) == (worker.pid, True)
        await worker_processes.kill(worker)

        async def dead() -> bool:
            return not (await queue.workers())[0].alive

        await until(dead, 10 * LEASE, "the killed worker to stop looking alive")
