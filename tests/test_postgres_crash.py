"""Crash safety on PostgreSQL (and SQLite): worker processes SIGKILLed at random, or told to
stop, while they share a database.

The same children as ``test_crash.py`` (``tests/crash_worker.py``), given a store URL; the test
process only enqueues and queries.
"""

from __future__ import annotations

import collections
import random
import signal
from typing import TYPE_CHECKING

import anyio
import pytest

from flexq import Call, State

from ._processes import (
    MAX_LEASE_EXPIRIES,
    all_final,
    all_jobs,
    producer,
    read_runs,
    run_poison,
    until,
)

if TYPE_CHECKING:
    from ._processes import WorkerProcesses

TENANTS = 5


@pytest.mark.slow
async def test_random_sigkills_of_workers_lose_no_job(store_workers: WorkerProcesses) -> None:
    """3 worker processes on PostgreSQL (2 on SQLite) share 10,000 jobs of 5 tenants; every
    second one of them is SIGKILLed and a new one started. Every job ends COMPLETED, none is
    lost, and only jobs that a killed process held ran more than once."""
    total, workers = 10_000, 8
    # Longer than the stalls of a loaded 2-core machine, on which a 1 s lease can expire under
    # a live process and add runs that no kill caused.
    lease = ("--lease", "3")
    processes = 3 if store_workers.url.startswith("postgresql") else 2
    rng = random.Random(6)
    async with producer(store_workers.url) as (queue, tasks):
        calls = [
            Call(tasks["work"], n, 0.002 + (n % 5) / 1000).with_options(tenant=f"t{n % TENANTS}")
            for n in range(total)
        ]
        ids = await queue.enqueue_many(calls)
        alive = [await store_workers.start(*lease, workers=workers) for _ in range(processes)]
        kills = 0
        with anyio.fail_after(90):
            while not await all_final(queue, total):
                await anyio.sleep(1.0)
                for process in alive:
                    store_workers.check_alive(process)
                if kills < 8:
                    victim = alive.pop(rng.randrange(len(alive)))
                    await store_workers.kill(victim)
                    assert victim.returncode == -signal.SIGKILL
                    kills += 1
                    alive.append(await store_workers.start(*lease, workers=workers))
        await until(lambda: all_final(queue, total), 30, "every job to be final")
        jobs = await all_jobs(queue)
        runs = await read_runs(store_workers.runs)

    assert kills >= 3, "the jobs ran out before enough kills: make them longer"
    assert any(info.errors for info in jobs.values()), "no kill interrupted a job"
    assert sorted(info.id for info in jobs.values()) == sorted(ids), "a job was lost"
    assert {info.state for info in jobs.values()} == {State.COMPLETED}
    assert {info.tenant for info in jobs.values()} == {f"t{i}" for i in range(TENANTS)}
    assert [n for n in range(total) if runs.dones[n] < 1] == [], "jobs that never ran to the end"
    extra = sum(count - 1 for count in runs.starts.values() if count > 1)
    # A killed process held at most its workers' jobs plus the outcomes not yet written.
    assert extra <= kills * 2 * workers, f"{extra} extra runs after {kills} kills"
    for n, info in jobs.items():
        assert info.result == n
        assert info.attempts == 1 + len(info.errors), info
        assert {error.type for error in info.errors} <= {"flexq.LeaseExpired"}


@pytest.mark.slow
async def test_sigterm_stops_a_worker_gracefully_under_load(pg_workers: WorkerProcesses) -> None:
    """A worker process told to stop (SIGTERM) while busy finishes its running jobs within the
    grace period and exits; the other process runs the rest. No job runs twice, none is left
    running, and no attempt is counted for the jobs handed back."""
    total, workers = 60, 4
    async with producer(pg_workers.url) as (queue, tasks):
        first = await pg_workers.start_ready(workers=workers)
        second = await pg_workers.start_ready(workers=workers)
        ids = await queue.enqueue_many([Call(tasks["work"], n, 0.3) for n in range(total)])

        async def busy() -> bool:
            runs = await read_runs(pg_workers.runs)
            started = [n for n, pids in runs.pids_by_job.items() if first.pid in pids]
            return len(started) >= workers

        await until(busy, 15, "the first worker to be busy")
        first.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):  # the Queue's grace period, with jobs of 0.3 s
            await first.wait()
        assert first.returncode == 0, "the worker did not stop gracefully"
        await until(lambda: all_final(queue, total), 30, "every job to be final")
        pg_workers.check_alive(second)
        jobs = await all_jobs(queue)
        runs = await read_runs(pg_workers.runs)

    assert sorted(info.id for info in jobs.values()) == sorted(ids)
    assert {(info.state, info.attempts) for info in jobs.values()} == {(State.COMPLETED, 1)}
    assert runs.starts == collections.Counter(range(total)), "a job ran twice, or never"
    assert runs.dones == runs.starts, "a job was cut off mid-run"
    assert runs.working_pids == {first.pid, second.pid}


@pytest.mark.slow
async def test_poison_pill_is_not_rescued_forever(pg_workers: WorkerProcesses) -> None:
    """A job that kills its worker process each time ends FAILED (flexq.LeaseExpired) after
    max_lease_expiries deaths on PostgreSQL too, while the jobs enqueued after it complete."""
    run = await run_poison(pg_workers, workers=1)

    assert run.deaths == MAX_LEASE_EXPIRIES
    assert (run.poison.state, run.poison.attempts) == (State.FAILED, MAX_LEASE_EXPIRIES)
    assert [e.type for e in run.poison.errors] == ["flexq.LeaseExpired"] * MAX_LEASE_EXPIRIES
    assert {info.state for info in run.others.values()} == {State.COMPLETED}


@pytest.mark.slow
async def test_tenants_share_workers_fairly_across_processes(pg_workers: WorkerProcesses) -> None:
    """Two running worker processes, a tenant that floods the queue with 2,000 jobs, then a
    tenant with 20: the small tenant's jobs are done soon after they arrive, long before the
    flood is, because every process shares its workers between the tenants it hears of."""
    flood, small = 2_000, 20
    async with producer(pg_workers.url) as (queue, tasks):
        first = await pg_workers.start_ready(workers=4)
        second = await pg_workers.start_ready(workers=4)
        await queue.enqueue_many(
            [Call(tasks["work"], n, 0.005).with_options(tenant="flood") for n in range(flood)]
        )
        await anyio.sleep(0.3)  # the flood is under way in both processes
        await queue.enqueue_many(
            [Call(tasks["work"], n, 0.005) for n in range(flood, flood + small)],
            tenant="small",
        )
        await until(lambda: all_final(queue, flood + small), 60, "every job to be final")
        pg_workers.check_alive(first)
        pg_workers.check_alive(second)
        lines = (await anyio.Path(pg_workers.runs).read_text()).splitlines()

    done = [int(line.split()[1]) for line in lines if line.startswith("done ")]
    assert sorted(done) == list(range(flood + small))
    last_small = max(i for i, n in enumerate(done) if n >= flood)
    flood_before = sum(1 for n in done[:last_small] if n < flood)
    # A fair share gives the small tenant half the workers: its 20 jobs end within about 40
    # jobs of its arrival. Without sharing they would wait for the whole flood.
    assert flood_before < flood / 2, f"{flood_before} flood jobs ran before the small tenant's"
    first_small = min(i for i, n in enumerate(done) if n >= flood)
    assert last_small - first_small < 10 * small, "the small tenant's jobs were spread out"
