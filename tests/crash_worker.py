"""A flexq worker process for the process tests: run it, SIGKILL it, run several at once.

Usage: ``python crash_worker.py URL RUNS BACKEND [--workers N] [--lease S] [--batches N]
[--schedule]``.

It opens a :class:`flexq.Queue` on the store ``URL`` (``sqlite:///...`` or ``postgresql://...``)
with a short lease, registers the tasks of :func:`register_tasks` and :func:`register_batch`,
appends ``ready <pid>`` to the file ``RUNS`` and works until it is killed (SIGTERM stops it
gracefully). Every task appends lines such as ``start <n> <pid>`` and ``done <n> <pid>`` to
``RUNS``, one ``os.write`` each on an ``O_APPEND`` descriptor, so that lines from several
processes never interleave and the tests can count how often each job ran, and where.

With ``--schedule`` it declares the every-second schedule :data:`SCHEDULE` before it is ready
(``scheduled <pid> <first fire time>``); with ``--batches N`` it enqueues ``N`` slot batches of
tenant :data:`SLOT_TENANT` each time it gets SIGUSR1 (``enqueued <pid> <from> <to>``), whose
``start`` and ``finish`` log ``slot begin|end <job id> <pid> <time.monotonic()>``: the
monotonic clock is one for every process of the host.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio

import flexq

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

LEASE = 1.0
POLL_INTERVAL = 0.05
MAX_ACTIVE_BATCHES = 5
SLOT_TENANT = "acme"
SCHEDULE = "every-second"


class RunLog:
    """Appends one line per event to a file shared by every process of a test."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, *fields: object) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, (" ".join(map(str, fields)) + "\n").encode())


def register_tasks(queue: flexq.Queue, runs: RunLog) -> dict[str, flexq.Task[Any]]:
    """Register the crash-test tasks; the test process registers them too, to enqueue them."""

    @queue.task(name="crash.work")
    async def work(n: int, duration: float) -> int:
        runs.write("start", n, os.getpid())
        await anyio.sleep(duration)
        runs.write("done", n, os.getpid())
        return n

    @queue.task(name="crash.poison")
    async def poison(n: int) -> None:
        runs.write("start", n, os.getpid())
        # Dies like an out-of-memory kill or a segfault: no cleanup, no outcome written.
        os.kill(os.getpid(), signal.SIGKILL)

    @queue.task(name="crash.tick")
    async def tick(ctx: flexq.Context) -> None:
        runs.write("tick", ctx.job_id, os.getpid())

    return {"work": work, "poison": poison, "tick": tick}


def register_batch(queue: flexq.Queue, runs: RunLog) -> type:
    """Register the crash-test batch: one item per chunk; chunk ``i`` logs ``chunk i pid``."""

    @queue.batch(name="crash.batch", scope=1)
    class CrashBatch:
        async def start(self, ctx: flexq.BatchContext, items: int, pause: float) -> list[Any]:
            runs.write("batch-start", os.getpid())
            return [[i, pause] for i in range(items)]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[Any]) -> None:
            for i, pause in chunk:
                runs.write("chunk", i, os.getpid())
                await anyio.sleep(pause)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            runs.write("batch-finish", os.getpid())

    @queue.batch(name="crash.slow-start", scope=1)
    class SlowStart(CrashBatch):
        async def start(  # type: ignore[override]
            self, ctx: flexq.BatchContext, items: int, pause: float
        ) -> AsyncIterator[list[Any]]:
            runs.write("batch-start", os.getpid())
            for i in range(items):
                await anyio.sleep(pause)
                yield [i, 0.0]

    @queue.batch(name="crash.slot", scope=1)
    class SlotBatch:
        """Logs the span in which it surely holds an active slot: from start to finish."""

        async def start(self, ctx: flexq.BatchContext, chunks: int, pause: float) -> list[float]:
            runs.write("slot", "begin", ctx.job_id, os.getpid(), time.monotonic())
            return [pause] * chunks

        async def execute(self, ctx: flexq.BatchContext, chunk: list[float]) -> None:
            for pause in chunk:
                await anyio.sleep(pause)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            runs.write("slot", "end", ctx.job_id, os.getpid(), time.monotonic())

    return CrashBatch


async def enqueue_slot_batches(queue: flexq.Queue, runs: RunLog, count: int) -> None:
    """Enqueue ``count`` slot batches one by one, each admitted (or held) in its own call."""
    began = time.monotonic()
    for _ in range(count):
        await queue.enqueue("crash.slot", 2, 0.02, tenant=SLOT_TENANT)
    runs.write("enqueued", os.getpid(), began, time.monotonic())


async def serve(
    url: str, runs_path: str, workers: int, lease: float, batches: int, schedule: bool
) -> None:
    runs = RunLog(runs_path)
    queue = flexq.Queue(
        url,
        workers=workers,
        lease=lease,
        poll_interval=POLL_INTERVAL,
        max_loop_lag=None,
        backoff=flexq.Backoff(base=0.01, maximum=0.05, jitter=0.0),
        limits=flexq.Limits(max_active_batches=MAX_ACTIVE_BATCHES, max_holding=1000),
    )
    tasks = register_tasks(queue, runs)
    register_batch(queue, runs)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as signals:
        async with queue:
            if schedule:
                # run_all: a firing that comes late on a loaded host still skips no time.
                info = await queue.schedule(
                    SCHEDULE, "* * * * * *", tasks["tick"], misfire="run_all"
                )
                assert info.next_fire_time is not None
                runs.write("scheduled", os.getpid(), info.next_fire_time.timestamp())
            runs.write("ready", os.getpid())
            async for signum in signals:
                if signum == signal.SIGTERM:  # leave `async with queue`, gracefully
                    break
                await enqueue_slot_batches(queue, runs, batches)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="the store URL")
    parser.add_argument("runs", help="the file every run of a task appends a line to")
    parser.add_argument("backend", choices=["asyncio", "trio"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lease", type=float, default=LEASE)
    parser.add_argument("--batches", type=int, default=0, help="slot batches to enqueue")
    parser.add_argument("--schedule", action="store_true", help="declare the schedule")
    options = parser.parse_args(argv)
    anyio.run(
        serve, options.url, options.runs, options.workers, options.lease, options.batches,
        options.schedule, backend=options.backend,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
