"""Where the end-to-end case spends its time: store round trips, and cProfile hotspots.

``python -m benchmarks.hotspots [--store sqlite|memory] [--backend asyncio|trio]`` runs the
end-to-end case twice: once unprofiled with a store that counts its calls (how many round
trips, how many jobs each, how busy the database thread is), once under cProfile (the event
loop thread and, for SQLite, the database thread, each profiled on its own).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

import flexq
from benchmarks._common import cpu_seconds, quiet_logs, rate
from benchmarks.throughput import EndToEnd, end_to_end
from flexq._store.memory import MemoryStore
from flexq._store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from flexq._store.base import ClaimedJob, EnqueueResult, EnqueueUnit, Outcome
    from flexq.abc import Store

T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class Calls:
    """Counts of one kind of store call."""

    calls: int = 0
    jobs: int = 0

    @property
    def per_call(self) -> float:
        """Jobs per call: how well calls are batched."""
        return self.jobs / self.calls if self.calls else 0.0


@dataclasses.dataclass(slots=True)
class StoreStats:
    """What a counting store saw."""

    calls: dict[str, Calls] = dataclasses.field(default_factory=dict)
    thread_seconds: float = 0.0
    """Time spent inside database-thread functions (SQLite only)."""
    thread_calls: int = 0
    profilers: dict[int, cProfile.Profile] | None = None

    def count(self, kind: str, jobs: int) -> None:
        """Record one call of ``kind`` that moved ``jobs`` jobs."""
        entry = self.calls.setdefault(kind, Calls())
        entry.calls += 1
        entry.jobs += jobs


class _CountingCalls:
    """Counts the store calls that move jobs; mixed into a store class."""

    stats: StoreStats

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        self.stats.count("enqueue", sum(len(unit.jobs) for unit in units))
        return await cast("Store", super()).enqueue(units, now)

    async def claim(
        self,
        owner: str,
        wanted: Mapping[str, int],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        jobs = await cast("Store", super()).claim(owner, wanted, tasks, now, lease_until)
        self.stats.count("claim", len(jobs))
        return jobs

    async def report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[str]:
        self.stats.count("report", len(outcomes))
        return await cast("Store", super()).report(owner, outcomes, now)

    async def promote(self, now: float) -> tuple[list[str], float | None]:
        self.stats.count("promote", 0)
        return await cast("Store", super()).promote(now)

    async def ready_tenants(self, tasks: Collection[str]) -> list[str]:
        self.stats.count("ready_tenants", 0)
        return await cast("Store", super()).ready_tenants(tasks)


class CountingSQLiteStore(_CountingCalls, SQLiteStore):
    """The SQLite store, counting calls and timing (or profiling) its database thread."""

    def __init__(self, path: str, stats: StoreStats) -> None:
        super().__init__(path)
        self.stats = stats

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await super()._run(self._in_thread, fn, *args)

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            profilers = self.stats.profilers
            if profilers is None:
                return fn(*args)
            profiler = profilers.setdefault(threading.get_ident(), cProfile.Profile())
            return profiler.runcall(fn, *args)
        finally:
            self.stats.thread_seconds += time.perf_counter() - started
            self.stats.thread_calls += 1


class CountingMemoryStore(_CountingCalls, MemoryStore):
    """The memory store, counting calls."""

    def __init__(self, stats: StoreStats) -> None:
        super().__init__()
        self.stats = stats


@dataclasses.dataclass(frozen=True, slots=True)
class Profiled:
    """The counted run, its CPU use, and the profiles."""

    run: EndToEnd
    stats: StoreStats
    cpu_share: float
    loop: pstats.Stats
    thread: pstats.Stats | None


def _store(kind: str, directory: str, stats: StoreStats) -> SQLiteStore | MemoryStore:
    if kind == "memory":
        return CountingMemoryStore(stats)
    path = Path(directory) / f"profile-{time.monotonic_ns()}.db"
    return CountingSQLiteStore(str(path), stats)


async def profile(kind: str, jobs: int, workers: int, directory: str) -> Profiled:
    """Run end to end once counting store calls, once under cProfile."""
    stats = StoreStats()
    cpu = cpu_seconds()
    run = await end_to_end(
        kind, kind, jobs, workers, queue_factory=_factory(kind, directory, stats)
    )
    cpu_share = (cpu_seconds() - cpu) / run.total_seconds

    profiled = StoreStats(profilers={})
    loop = cProfile.Profile()
    loop.enable()
    try:
        await end_to_end(
            kind, kind, jobs, workers, queue_factory=_factory(kind, directory, profiled)
        )
    finally:
        loop.disable()
    thread = pstats.Stats(*profiled.profilers.values()) if profiled.profilers else None
    return Profiled(
        run=run, stats=stats, cpu_share=cpu_share, loop=pstats.Stats(loop), thread=thread
    )


def _factory(kind: str, directory: str, stats: StoreStats) -> type[flexq.Queue]:
    """A Queue class whose URL argument is ignored in favour of a counting store."""

    class CountingQueue(flexq.Queue):
        def __init__(self, url: str, **options: Any) -> None:
            super().__init__(_store(kind, directory, stats), **options)

    return CountingQueue


def _where(path: str, line: int, name: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3.", "/benchmarks/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[-1]
            break
    return f"{path}:{line}({name})" if line else name


def table(stats: pstats.Stats, top: int, *, sort: str = "own", only: str | None = None) -> str:
    """The ``top`` functions by own (``own``) or cumulative (``cum``) time.

    ``only`` keeps functions whose file path contains it (e.g. ``"/flexq/"``). Percentages are
    of the whole profile's own time; a coroutine's calls count each resumption.
    """
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(value[2] for value in entries.values()) or 1.0
    rows = [
        (tt, ct, nc, _where(path, line, name))
        for (path, line, name), (_, nc, tt, ct, _) in entries.items()
        if only is None or only in path
    ]
    rows.sort(key=lambda row: row[0] if sort == "own" else row[1], reverse=True)
    lines = [f"  {'own s':>7}{'own %':>7}{'cum s':>8}{'calls':>9}  function"]
    lines += [
        f"  {tt:>7.3f}{tt / total:>7.1%}{ct:>8.3f}{nc:>9,}  {where}"
        for tt, ct, nc, where in rows[:top]
    ]
    return "\n".join(lines)


def report(result: Profiled, top: int = 25) -> str:
    """The profile as text to print."""
    run, stats = result.run, result.stats
    lines = [
        f"end to end ({run.store}, workers={run.workers}, {run.jobs:,} jobs, unprofiled):"
        f" {run.total_rate:,.0f} jobs/s; process CPU {result.cpu_share:.2f} cores",
        "store calls (calls, jobs, jobs per call):",
    ]
    lines += [
        f"  {kind:<14}{entry.calls:>8,}{entry.jobs:>10,}{entry.per_call:>10.1f}"
        for kind, entry in stats.calls.items()
    ]
    if stats.thread_calls:
        busy = stats.thread_seconds / run.total_seconds
        lines.append(
            f"database thread: {stats.thread_calls:,} calls, busy {busy:.0%} of the wall time,"
            f" {stats.thread_seconds / stats.thread_calls * 1e3:.3f} ms a call,"
            f" {rate(run.jobs, stats.thread_seconds):,.0f} jobs per busy second"
        )
    lines += [
        "",
        "event loop thread, by own time (cProfile):",
        table(result.loop, top),
        "",
        "event loop thread, flexq's own functions by cumulative time:",
        table(result.loop, top, sort="cum", only="/flexq/"),
    ]
    if result.thread is not None:
        lines += ["", "database thread, by own time (cProfile):", table(result.thread, top // 2)]
    return "\n".join(lines)


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="flexq-profile-") as directory:
        run = functools.partial(profile, args.store, args.jobs, args.workers, directory)
        result = anyio.run(run, backend=args.backend)
    print(report(result, args.top))


if __name__ == "__main__":
    main()
