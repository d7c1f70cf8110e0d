"""Crash safety: killed workers, several worker processes on one file, graceful shutdown.

Worker processes are real children (``tests/crash_worker.py``, run by ``tests/_processes.py``)
on a SQLite file in the test's directory; the test process only enqueues and queries
(``queue.open()``, no workers). Every task run appends ``start``/``done`` lines to a shared run
log, so runs can be counted per job and per process.
"""

from __future__ import annotations

import collections
import signal
import time
from typing import TYPE_CHECKING

import anyio
import pytest

import flexq
from flexq import Call, State

from ._processes import (
    MAX_LEASE_EXPIRIES,
    all_final,
    all_jobs,
    producer,
    read_runs,
    run_poison,
    until,
    work_calls,
)
from .crash_worker import LEASE

if TYPE_CHECKING:
    from ._processes import WorkerProcesses
    from .conftest import StoreFactory


@pytest.mark.slow
async def test_sigkill_mid_run_loses_no_job(worker_processes: WorkerProcesses) -> None:
    """After a worker process is SIGKILLed mid-run, a new one completes every job, re-running
    only the jobs that the dead one held."""
    total, workers = 300, 4
    async with producer(worker_processes.url) as (queue, tasks):
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
    async with producer(worker_processes.url) as (queue, tasks):
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
    async with producer(worker_processes.url) as (queue, tasks):
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
    async with producer(worker_processes.url) as (queue, tasks):
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
    async with producer(worker_processes.url) as (queue, _):
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
    async with producer(worker_processes.url) as (queue, _):
        worker = await worker_processes.start_ready()
        (listed,) = await queue.workers()
        assert (listed.pid, listed.alive) == (worker.pid, True)
        await worker_processes.kill(worker)

        async def dead() -> bool:
            return not (await queue.workers())[0].alive

        await until(dead, 10 * LEASE, "the killed worker to stop looking alive")
