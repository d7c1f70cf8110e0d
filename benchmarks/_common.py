"""Helpers shared by the benchmark cases: quiet logs, clocks, statistics, memory, fills."""

from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import time
from typing import TYPE_CHECKING

import structlog

from flexq._states import Kind
from flexq._store.base import EnqueueUnit, NewJob

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flexq._store.sqlite import SQLiteStore

NOOP_TASK = "bench.noop"
"""The task name every benchmark job uses."""

FILL_TENANTS = 10
"""How many tenants a direct store fill spreads its jobs over."""


def quiet_logs() -> None:
    """Let only warnings and errors of flexq's structlog loggers through."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def sqlite_url(path: str) -> str:
    """The flexq URL of the SQLite file at ``path``."""
    return f"sqlite:///{os.path.abspath(path)}"


def rate(count: int, seconds: float) -> float:
    """Items per second (inf for a zero duration)."""
    return count / seconds if seconds > 0 else float("inf")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (inclusive method, linear interpolation)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    index = round(fraction * 1000) - 1
    return cuts[max(0, min(index, len(cuts) - 1))]


def rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mb() -> float:
    """This process's highest resident set size so far, in MiB."""
    peak = _status_kib("VmHWM")
    if peak:
        return peak / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User plus system CPU time this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if field == "VmRSS":  # no /proc: the peak is the best figure there is
        scale = 1 if sys.platform != "darwin" else 1 / 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    return 0


def new_jobs(start: int, stop: int, now: float, task: str = NOOP_TASK) -> list[NewJob]:
    """Waiting no-op jobs numbered ``start`` to ``stop - 1``, spread over the fill tenants."""
    return [
        NewJob(
            id=os.urandom(16).hex(),
            task=task,
            kind=Kind.QUEUEABLE,
            tenant=f"t{i % FILL_TENANTS}",
            priority=0,
            args=f"[{i}]",
            kwargs="{}",
            max_attempts=1,
            timeout=None,
            run_at=now,
            key=None,
            parent_id=None,
        )
        for i in range(start, stop)
    ]


async def fill(
    store: SQLiteStore, count: int, *, chunk: int = 50_000, task: str = NOOP_TASK
) -> float:
    """Insert ``count`` waiting jobs through the store's API, a chunk a transaction.

    Returns the seconds it took.
    """
    started = time.perf_counter()
    now = time.time()
    for first in range(0, count, chunk):
        jobs = new_jobs(first, min(count, first + chunk), now, task)
        await store.enqueue([EnqueueUnit(jobs, "raise")], now)
    return time.perf_counter() - started
