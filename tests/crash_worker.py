"""A flexq worker process for the crash tests: run it, SIGKILL it, run it again.

Usage: ``python crash_worker.py DB RUNS BACKEND [--workers N] [--lease S]``.

It opens a :class:`flexq.Queue` on the SQLite file ``DB`` (or the store URL ``DB``, such as
``postgresql://...``) with a short lease, registers the tasks of :func:`register_tasks`,
appends ``ready <pid>`` to the file ``RUNS`` and works until it is killed (SIGTERM stops it
gracefully). Every task appends ``start <n> <pid>`` and ``done <n> <pid>`` lines to ``RUNS``,
one ``os.write`` each on an ``O_APPEND`` descriptor, so that lines from several processes never
interleave and the tests can count how often each job ran, and where.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio

import flexq

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

LEASE = 1.0
POLL_INTERVAL = 0.05


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

    return {"work": work, "poison": poison}


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

    return CrashBatch


async def serve(db: str, runs_path: str, workers: int, lease: float) -> None:
    runs = RunLog(runs_path)
    queue = flexq.Queue(
        db if "://" in db else f"sqlite:///{db}",
        workers=workers,
        lease=lease,
        poll_interval=POLL_INTERVAL,
        max_loop_lag=None,
        backoff=flexq.Backoff(base=0.01, maximum=0.05, jitter=0.0),
    )
    register_tasks(queue, runs)
    register_batch(queue, runs)
    with anyio.open_signal_receiver(signal.SIGTERM) as stop_signals:
        async with queue:
            runs.write("ready", os.getpid())
            async for _ in stop_signals:  # SIGTERM: leave `async with queue`, gracefully
                break


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db", help="the SQLite file, or a store URL")
    parser.add_argument("runs", help="the file every run of a task appends a line to")
    parser.add_argument("backend", choices=["asyncio", "trio"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lease", type=float, default=LEASE)
    options = parser.parse_args(argv)
    anyio.run(
        serve, options.db, options.runs, options.workers, options.lease, backend=options.backend
    )


if __name__ == "__main__":
    main(sys.argv[1:])
