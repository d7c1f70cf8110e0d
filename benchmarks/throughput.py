"""Throughput: no-op jobs end to end (many producers, one by one), and enqueue_many."""

from __future__ import annotations

import dataclasses
import time

import anyio

import flexq
from benchmarks._common import NOOP_TASK, rate

PRODUCERS = 100
"""Concurrent producer tasks in the end-to-end case."""


@dataclasses.dataclass(frozen=True, slots=True)
class EndToEnd:
    """One end-to-end run: ``jobs`` enqueued by ``producers`` tasks and all run."""

    store: str
    workers: int
    max_loop_lag: float | None
    jobs: int
    enqueue_seconds: float
    """From the first enqueue until every producer's last enqueue returned."""
    total_seconds: float
    """From the first enqueue until the last job's handler returned."""

    @property
    def enqueue_rate(self) -> float:
        """Jobs made durable per second while workers ran them too."""
        return rate(self.jobs, self.enqueue_seconds)

    @property
    def total_rate(self) -> float:
        """Jobs enqueued and run per second: the headline figure."""
        return rate(self.jobs, self.total_seconds)


async def end_to_end(
    url: str,
    store: str,
    jobs: int,
    workers: int,
    *,
    producers: int = PRODUCERS,
    max_loop_lag: float | None = None,
    queue_factory: type[flexq.Queue] = flexq.Queue,
    timeout: float = 300.0,
) -> EndToEnd:
    """Enqueue ``jobs`` no-op jobs from ``producers`` tasks, one ``enqueue`` each, run them all."""
    queue = queue_factory(url, workers=workers, max_loop_lag=max_loop_lag)
    done = 0
    finished = anyio.Event()

    @queue.task(name=NOOP_TASK)
    async def noop(i: int) -> None:
        nonlocal done
        done += 1
        if done == jobs:
            finished.set()

    issued = 0

    async def produce() -> None:
        nonlocal issued
        while issued < jobs:
            issued += 1
            await queue.enqueue(noop, issued)

    with anyio.fail_after(timeout):
        async with queue:
            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(producers):
                    group.start_soon(produce)
            enqueued = time.perf_counter()
            await finished.wait()
            ended = time.perf_counter()
    return EndToEnd(
        store=store,
        workers=workers,
        max_loop_lag=max_loop_lag,
        jobs=jobs,
        enqueue_seconds=enqueued - started,
        total_seconds=ended - started,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class EnqueueMany:
    """``enqueue_many`` of ``jobs`` calls, repeated; the best and median rounds."""

    store: str
    jobs: int
    seconds: list[float]

    @property
    def best_rate(self) -> float:
        """Jobs per second of the fastest round."""
        return rate(self.jobs, min(self.seconds))

    @property
    def median_rate(self) -> float:
        """Jobs per second of the median round."""
        ordered = sorted(self.seconds)
        return rate(self.jobs, ordered[len(ordered) // 2])


async def enqueue_many(url: str, store: str, jobs: int, rounds: int = 3) -> EnqueueMany:
    """Time ``queue.enqueue_many`` of ``jobs`` no-op calls (built beforehand), no workers."""
    queue = flexq.Queue(url, max_loop_lag=None)

    @queue.task(name=NOOP_TASK)
    async def noop(i: int) -> None:
        pass

    seconds = []
    await queue.open()
    try:
        for _ in range(rounds):
            calls = [flexq.Call(noop, i) for i in range(jobs)]
            started = time.perf_counter()
            ids = await queue.enqueue_many(calls)
            seconds.append(time.perf_counter() - started)
            assert len(ids) == jobs
    finally:
        await queue.close()
    return EnqueueMany(store=store, jobs=jobs, seconds=seconds)
