"""flexq on PostgreSQL, measured the way the PostgreSQL peers are (``peer_pgqueuer.py``).

- run rate: N no-op jobs wait in the queue; a worker queue in this process, or several worker
  processes, run them all; from the moment the workers may claim until the last job is done.
- one-by-one enqueue: ``await queue.enqueue(task, i)`` from one task (as the peers do), and from
  100 concurrent tasks (group commit), no workers running.
- idle latency: ``benchmarks.latency`` on a PostgreSQL URL.

Worker processes: ``python -m benchmarks.postgres worker URL WORKERS BACKEND`` opens a worker
queue, prints ``ready`` and runs until killed. The parent pauses the queue before it starts
them and resumes it once all are ready, so they start at once; it polls the counts until every
job is COMPLETED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

import flexq
from benchmarks import latency
from benchmarks._common import NOOP_TASK, quiet_logs, rate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

DSN = os.environ.get(
    "FLEXQ_BENCH_POSTGRES_DSN",
    os.environ.get("FLEXQ_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
FILL_CHUNK = 10_000
PRODUCERS = 100


def fresh_url(dsn: str = DSN) -> str:
    """A URL of ``dsn`` with flexq's tables in a new schema of their own (see :func:`drop`)."""
    parsed = urllib.parse.urlsplit(dsn)
    schema = f"flexq_bench_{uuid.uuid4().hex[:12]}"
    query = [*urllib.parse.parse_qsl(parsed.query), ("schema", schema)]
    return parsed._replace(query=urllib.parse.urlencode(query)).geturl()


def drop(url: str) -> None:
    """Drop the schema of a :func:`fresh_url`, with every table in it."""
    import psycopg

    from flexq._store.postgres import PostgresStore
    from flexq._store.url import store_from_url

    store = store_from_url(url)
    assert isinstance(store, PostgresStore)
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


def noop_queue(
    url: str, on_run: Callable[[int], None] | None = None, **options: Any
) -> tuple[flexq.Queue, flexq.Task[None]]:
    """A queue with the benchmark's no-op task, which calls ``on_run(i)`` if given."""
    queue = flexq.Queue(url, max_loop_lag=None, **options)

    @queue.task(name=NOOP_TASK)
    async def noop(i: int) -> None:
        if on_run is not None:
            on_run(i)

    return queue, noop


async def fill(url: str, jobs: int, *, paused: bool = False) -> None:
    """Enqueue ``jobs`` waiting no-op jobs (``enqueue_many`` in chunks); pause the queue first
    if asked."""
    queue, noop = noop_queue(url)
    await queue.open()
    try:
        if paused:
            await queue.pause()
        for first in range(0, jobs, FILL_CHUNK):
            last = min(jobs, first + FILL_CHUNK)
            await queue.enqueue_many([flexq.Call(noop, i) for i in range(first, last)])
    finally:
        await queue.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """N waiting jobs run by ``processes`` processes of ``workers`` workers each."""

    jobs: int
    workers: int
    processes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Jobs run per second."""
        return rate(self.jobs, self.seconds)


async def drain(url: str, jobs: int, workers: int) -> Drain:
    """Fill ``jobs`` jobs, then time a worker queue in this process running them all (from
    entering ``async with queue``, which connects, to the last handler's return)."""
    await fill(url, jobs)
    done = 0
    finished = anyio.Event()

    def count(i: int) -> None:
        nonlocal done
        done += 1
        if done == jobs:
            finished.set()

    queue, _ = noop_queue(url, count, workers=workers)
    with anyio.fail_after(300):
        started = time.perf_counter()
        async with queue:
            await finished.wait()
            seconds = time.perf_counter() - started
    return Drain(jobs=jobs, workers=workers, processes=1, seconds=seconds)


@contextlib.asynccontextmanager
async def worker_processes(
    url: str, processes: int, workers: int, backend: str = "asyncio"
) -> AsyncIterator[None]:
    """Worker processes on ``url``, each with ``workers`` workers, up and running; killed at
    the end."""
    command = [
        sys.executable, "-m", "benchmarks.postgres", "worker", url, str(workers), backend
    ]  # fmt: skip
    children = [await anyio.open_process(command) for _ in range(processes)]
    try:
        for child in children:
            assert child.stdout is not None
            with anyio.fail_after(60):
                line = await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 100)
            if line.strip() != b"ready":
                raise RuntimeError(f"a worker process failed to start: {line!r}")
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for child in children:
                child.kill()
                await child.wait()
                await child.aclose()


async def drain_processes(
    url: str, jobs: int, workers: int, processes: int, backend: str = "asyncio"
) -> Drain:
    """Fill ``jobs`` jobs into a paused queue, start ``processes`` worker processes, resume,
    and time until every job is COMPLETED (the counts are polled every 10 ms)."""
    await fill(url, jobs, paused=True)
    async with worker_processes(url, processes, workers, backend):
        queue, _ = noop_queue(url)
        await queue.open()
        try:
            with anyio.fail_after(300):
                started = time.perf_counter()
                await queue.resume()
                # Other processes do the work: nothing here can signal the end, so poll.
                while True:
                    if (await queue.counts())[flexq.State.COMPLETED] >= jobs:
                        break
                    await anyio.sleep(0.01)
                seconds = time.perf_counter() - started
        finally:
            await queue.close()
    return Drain(jobs=jobs, workers=workers, processes=processes, seconds=seconds)


async def idle_latency_beside(
    url: str, samples: int, processes: int, backend: str = "asyncio"
) -> latency.Latency:
    """:func:`benchmarks.latency.idle_latency` with ``processes`` idle worker processes
    sharing the database."""
    async with worker_processes(url, processes, 8, backend):
        return await latency.idle_latency(url, "postgres", samples)


@dataclasses.dataclass(frozen=True, slots=True)
class Enqueue:
    """``jobs`` one-by-one enqueues from ``producers`` concurrent tasks, no workers."""

    jobs: int
    producers: int
    seconds: float

    @property
    def rate(self) -> float:
        """Jobs made durable per second."""
        return rate(self.jobs, self.seconds)


async def enqueue_one_by_one(url: str, jobs: int, producers: int) -> Enqueue:
    """Time ``jobs`` calls of ``await queue.enqueue(task, i)`` from ``producers`` tasks."""
    queue, noop = noop_queue(url)
    issued = 0

    async def produce() -> None:
        nonlocal issued
        while issued < jobs:
            issued += 1
            await queue.enqueue(noop, issued)

    await queue.open()
    try:
        with anyio.fail_after(300):
            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(producers):
                    group.start_soon(produce)
            seconds = time.perf_counter() - started
    finally:
        await queue.close()
    return Enqueue(jobs=jobs, producers=producers, seconds=seconds)


async def _serve(url: str, workers: int) -> None:
    queue, _ = noop_queue(url, workers=workers)
    async with queue:
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 5:
        sys.exit("usage: python -m benchmarks.postgres worker URL WORKERS BACKEND")
    quiet_logs()
    anyio.run(_serve, sys.argv[2], int(sys.argv[3]), backend=sys.argv[4])
