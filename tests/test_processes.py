"""Promises that span processes, kept by real worker processes sharing one database
(a PostgreSQL schema, or a SQLite file): a tenant's active batch slots, and a schedule that
several processes fire.

The workers are ``tests/crash_worker.py`` children; they log what actually ran to a shared run
log, and the test process only queries (and pauses the schedule).
"""

from __future__ import annotations

import collections
import signal
import time
from typing import TYPE_CHECKING

import pytest

from flexq import State

from ._processes import SlotEvent, all_final, producer, read_runs, until
from .crash_worker import MAX_ACTIVE_BATCHES, SCHEDULE, SLOT_TENANT

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._processes import WorkerProcesses

PROCESSES = 3
LEASE = "10"
"""Long leases: a worker slowed down by a loaded host must not lose its job to another."""


def most_at_once(events: Iterable[SlotEvent]) -> int:
    """The most slot batches that ran at one instant (an end and a begin at the same time do
    not overlap: the end came first)."""
    running = most = 0
    for event in sorted(events, key=lambda event: (event.at, event.what == "begin")):
        running += 1 if event.what == "begin" else -1
        most = max(most, running)
    return most


def test_most_at_once_counts_overlapping_intervals() -> None:
    """The overlap count sees nesting and chains, and an end meeting a begin is no overlap."""
    spans = [(0.0, 4.0, "a"), (1.0, 2.0, "b"), (2.0, 3.0, "c"), (3.5, 5.0, "d")]
    events = [SlotEvent(begin, "begin", job_id, 1) for begin, _, job_id in spans]
    events += [SlotEvent(end, "end", job_id, 1) for _, end, job_id in spans]
    assert most_at_once(events) == 2
    assert most_at_once([*events, SlotEvent(1.5, "begin", "e", 1)]) == 3


@pytest.mark.slow
async def test_processes_racing_for_batch_slots_never_run_more_than_five(
    store_workers: WorkerProcesses,
) -> None:
    """Three worker processes enqueue batch jobs of one tenant at the same moment and run
    them, in rounds that each start with every slot free: the batches that actually ran
    overlapped by 5 at most, never 6, though all 5 slots were busy at once; every batch ran
    once."""
    rounds, per_process = 5, 4
    total = 0
    options = ("--batches", str(per_process), "--lease", LEASE)
    processes = [await store_workers.start(*options) for _ in range(PROCESSES)]
    await store_workers.wait_ready(*processes)
    async with producer(store_workers.url) as (queue, _):

        async def all_ran() -> bool:
            for process in processes:
                store_workers.check_alive(process)
            return await all_final(queue, total)

        for _ in range(rounds):
            # The slots fill up from none while all three enqueue: the admissions race most.
            for process in processes:
                process.send_signal(signal.SIGUSR1)
            total += PROCESSES * per_process
            await until(all_ran, 30, "every batch to be final")
        counts = await queue.counts(tenant=SLOT_TENANT)
        usage = await queue.limits(SLOT_TENANT)
    runs = await read_runs(store_workers.runs)

    assert {state: n for state, n in counts.items() if n} == {State.COMPLETED: total}
    assert (usage.holding, usage.active_batches) == (0, 0)
    begins = collections.Counter(e.job_id for e in runs.slots if e.what == "begin")
    ends = collections.Counter(e.job_id for e in runs.slots if e.what == "end")
    assert len(begins) == total
    assert begins == ends == collections.Counter(begins.keys()), "a batch ran twice"
    assert most_at_once(runs.slots) == MAX_ACTIVE_BATCHES
    assert len({event.pid for event in runs.slots}) >= 2, "one process ran every batch"
    assert sorted(map(len, runs.enqueued.values())) == [rounds] * PROCESSES
    raced = [
        max(began for began, _ in windows) < min(ended for _, ended in windows)
        for windows in zip(*runs.enqueued.values(), strict=True)
    ]
    assert any(raced), "the processes never enqueued at the same time: nothing raced"


@pytest.mark.slow
async def test_three_processes_fire_each_time_of_a_schedule_once(
    store_workers: WorkerProcesses,
) -> None:
    """Three worker processes declare the same every-second schedule and race to fire it for
    several seconds: every second from the first fire time to the last has exactly one job,
    none skipped, and each job runs once."""
    options = ("--schedule", "--lease", LEASE)
    processes = [await store_workers.start(*options) for _ in range(PROCESSES)]
    await store_workers.wait_ready(*processes)
    all_up = time.time()
    async with producer(store_workers.url) as (queue, _):

        async def fired_a_few_times() -> bool:
            for process in processes:
                store_workers.check_alive(process)
            info = await queue.get_schedule(SCHEDULE)
            last = info.previous_fire_time
            return last is not None and last.timestamp() >= all_up + 4

        await until(fired_a_few_times, 20, "four fire times with every process up")
        await queue.pause_schedule(SCHEDULE)
        info = await queue.get_schedule(SCHEDULE)
        jobs = list((await queue.jobs(kind="scheduled", limit=1000)).items)

        async def all_ran() -> bool:
            return await all_final(queue, len(jobs))

        await until(all_ran, 20, "every scheduled job to be final")
        finished = list((await queue.jobs(kind="scheduled", limit=1000)).items)
    runs = await read_runs(store_workers.runs)

    assert len(runs.scheduled) == PROCESSES, "a process did not declare the schedule"
    first = min(runs.scheduled.values())
    assert info.previous_fire_time is not None
    last = info.previous_fire_time.timestamp()
    run_ats = sorted(job.run_at.timestamp() for job in jobs)
    every_second = [first + n for n in range(round(last - first) + 1)]
    assert run_ats == every_second, "a fire time got no job, or more than one"
    assert info.times_triggered == len(jobs)
    assert {job.id for job in finished} == {job.id for job in jobs}
    assert {(job.state, job.tenant) for job in finished} == {(State.COMPLETED, "default")}
    assert runs.ticks == collections.Counter(job.id for job in jobs), "a job ran twice"
