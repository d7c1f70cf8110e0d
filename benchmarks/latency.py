"""Idle latency: from ``enqueue`` on an idle open queue to the start of the job's handler."""

from __future__ import annotations

import dataclasses
import time

import anyio

import flexq
from benchmarks._common import NOOP_TASK, percentile


@dataclasses.dataclass(frozen=True, slots=True)
class Latency:
    """Samples in seconds: enqueue call to handler start, and to enqueue's return."""

    store: str
    workers: int
    start: list[float]
    enqueue: list[float]

    def start_ms(self, fraction: float) -> float:
        """A quantile of enqueue-to-handler-start, in milliseconds."""
        return percentile(self.start, fraction) * 1000

    def enqueue_ms(self, fraction: float) -> float:
        """A quantile of enqueue's own duration (the durable write), in milliseconds."""
        return percentile(self.enqueue, fraction) * 1000


async def idle_latency(
    url: str,
    store: str,
    samples: int,
    *,
    workers: int = 8,
    gap: float = 0.01,
    warmup: int = 10,
    timeout: float = 120.0,
) -> Latency:
    """Enqueue one job at a time into an idle queue (default options) and time its start.

    Each sample waits for its handler to start, then sleeps ``gap`` seconds so the queue is idle
    again (its completion reported, workers parked) before the next enqueue.
    """
    queue = flexq.Queue(url, workers=workers)
    started_at: dict[int, float] = {}
    started = anyio.Event()

    @queue.task(name=NOOP_TASK)
    async def probe(i: int) -> None:
        started_at[i] = time.perf_counter()
        started.set()

    start: list[float] = []
    enqueue: list[float] = []
    with anyio.fail_after(timeout):
        async with queue:
            await anyio.sleep(0.1)
            for i in range(warmup + samples):
                started = anyio.Event()
                before = time.perf_counter()
                await queue.enqueue(probe, i)
                returned = time.perf_counter()
                await started.wait()
                if i >= warmup:
                    start.append(started_at[i] - before)
                    enqueue.append(returned - before)
                await anyio.sleep(gap)
    return Latency(store=store, workers=workers, start=start, enqueue=enqueue)
