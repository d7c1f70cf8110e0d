"""Batch jobs: items through start, execute and finish; and moves in the holding queue.

``python -m benchmarks.batch [--items N] [--moves N] [--store sqlite|memory|both]
[--backend asyncio|trio|both]`` runs this case alone; ``python -m benchmarks.run`` runs it as
case 7. ``--profile`` then shows where the time goes on SQLite: the store calls of the batch
(how many, how long they were awaited, how busy the database thread was), and each move split
into the hand-over to the database thread, the transaction, and the hand-over back.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

import flexq
from benchmarks._common import quiet_logs, rate, rss_mb, sqlite_url
from flexq._store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from flexq._models import JobId
    from flexq._store.base import Placement

BATCH_TASK = "bench.batch"
"""The task name of the benchmark's batch class."""
HOLD_TASK = "bench.held"
"""The task name of the jobs that wait in the holding queue while they are moved."""
SCOPE = 200
"""Items per chunk."""
TENANT = "bench"


@dataclasses.dataclass(frozen=True, slots=True)
class BatchThroughput:
    """One batch job of ``items`` integers with a no-op ``execute``, from enqueue to final."""

    store: str
    items: int
    scope: int
    start_seconds: float
    """From ``start``'s first line until the first ``execute``: the items streamed into the
    store and committed."""
    execute_seconds: float
    """From the first ``execute`` until ``finish`` was called: every chunk run and its
    checkpoint written."""
    total_seconds: float
    """From the ``enqueue`` call until ``finish`` returned: admission, claim, start, every
    chunk and finish."""
    final_seconds: float
    """From the ``enqueue`` call until ``queue.wait`` saw the job COMPLETED."""
    rss_growth_mb: float
    """How far the process's resident memory rose above its level at ``enqueue`` while the
    batch ran (sampled every 10 ms): what streaming and paging the items cost in memory."""

    @property
    def rate(self) -> float:
        """Items per second through start, execute and finish: the headline figure."""
        return rate(self.items, self.total_seconds)

    @property
    def start_rate(self) -> float:
        """Items per second that ``start`` streamed into the store."""
        return rate(self.items, self.start_seconds)

    @property
    def execute_rate(self) -> float:
        """Items per second that went through ``execute`` with their checkpoints."""
        return rate(self.items, self.execute_seconds)


async def batch_throughput(
    url: str | SQLiteStore,
    store: str,
    items: int,
    *,
    scope: int = SCOPE,
    timeout: float = 600.0,
) -> BatchThroughput:
    """Enqueue one batch job whose ``start`` yields ``items`` integers; time it to the end."""
    queue = flexq.Queue(url, max_loop_lag=None)
    marks: dict[str, float] = {}

    @queue.batch(name=BATCH_TASK, scope=scope)
    class Numbers:
        async def start(self, ctx: flexq.BatchContext, count: int) -> AsyncIterator[int]:
            marks["start"] = time.perf_counter()
            for i in range(count):
                yield i

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if "execute" not in marks:
                marks["execute"] = time.perf_counter()

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            marks["finish"] = time.perf_counter()
            return summary.items_processed

    base = peak = rss_mb()

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb())
            await anyio.sleep(0.01)

    with anyio.fail_after(timeout):
        async with queue, anyio.create_task_group() as group:
            group.start_soon(sample_rss)
            enqueued = time.perf_counter()
            job_id = await queue.enqueue(Numbers, items)
            info = await queue.wait(job_id)
            final = time.perf_counter()
            group.cancel_scope.cancel()
    finished = marks["finish"]
    if info.state is not flexq.State.COMPLETED or info.result != items:
        raise RuntimeError(f"the batch ended {info.state} with {info.result!r} items processed")
    return BatchThroughput(
        store=store,
        items=items,
        scope=scope,
        start_seconds=marks.get("execute", finished) - marks["start"],
        execute_seconds=finished - marks.get("execute", finished),
        total_seconds=finished - enqueued,
        final_seconds=final - enqueued,
        rss_growth_mb=peak - base,
    )


MoveKind = Literal["front", "before", "to"]
MOVE_KINDS: tuple[MoveKind, ...] = ("front", "before", "to")
Move = tuple[MoveKind, int, int]
"""A move of the benchmark: (kind, index of the job moved, index of the other job or the
position)."""


def plan_moves(count: int, holding: int, seed: int = 1) -> list[Move]:
    """``count`` moves among ``holding`` jobs, a third each of move_to_front, move_before
    (another job) and move_to (a random position), in a random order."""
    rng = random.Random(seed)
    moves: list[Move] = []
    for n in range(count):
        job = rng.randrange(holding)
        kind = MOVE_KINDS[n % 3]
        if kind == "before":
            other = rng.randrange(holding - 1)
            moves.append((kind, job, other if other < job else other + 1))
        elif kind == "to":
            moves.append((kind, job, rng.randrange(holding)))
        else:
            moves.append((kind, job, 0))
    rng.shuffle(moves)
    return moves


def replay(order: Sequence[int], moves: Sequence[Move]) -> list[int]:
    """The order after ``moves``, on a plain list: what the store must agree with."""
    model = list(order)
    for kind, job, other in moves:
        model.remove(job)
        if kind == "front":
            model.insert(0, job)
        elif kind == "before":
            model.insert(model.index(other), job)
        else:
            model.insert(other, job)
    return model


@dataclasses.dataclass(frozen=True, slots=True)
class FlexMoves:
    """``moves`` reorderings of one tenant's holding queue of ``holding`` jobs."""

    store: str
    holding: int
    moves: int
    movers: int
    """Tasks that issued the moves, each awaiting its moves one after the other."""
    seconds: float
    changed: int
    """Moves that changed the order (a move to where the job already is changes nothing)."""
    order_seconds: float
    """The median duration of one ``flex.order(tenant)``."""

    @property
    def rate(self) -> float:
        """Moves per second: the headline figure."""
        return rate(self.moves, self.seconds)


async def flex_moves(
    url: str | SQLiteStore,
    store: str,
    moves: int,
    *,
    holding: int = 100,
    movers: int = 1,
    timeout: float = 300.0,
) -> FlexMoves:
    """Fill a holding queue (``max_active_batches=0`` keeps every job HOLDING), then time a
    planned mix of moves.

    With one mover the moves are awaited one after the other (each pays the full round trip
    to the store) and the final order must equal the list model's. With more, ``movers`` tasks
    share the plan and their moves queue up at the store; the order must still hold every job
    once.
    """
    queue = flexq.Queue(
        url,
        max_loop_lag=None,
        limits=flexq.Limits(max_holding=holding, max_active_batches=0),
    )

    @queue.batch(name=HOLD_TASK)
    class Held:
        async def start(self, ctx: flexq.BatchContext, n: int) -> list[int]:
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    plan = plan_moves(moves, holding)
    with anyio.fail_after(timeout):
        async with queue:
            flex = queue.flex
            ids = [await queue.enqueue(Held, n, tenant=TENANT) for n in range(holding)]
            if await flex.order(TENANT) != ids:
                raise RuntimeError("the holding queue is not in enqueue order")
            calls = [_move_call(flex, kind, ids[job], ids, other) for kind, job, other in plan]
            changed = 0
            timed = url if isinstance(url, TimedSQLiteStore) else None

            async def mover(share: Sequence[functools.partial[Any]]) -> None:
                nonlocal changed
                for call in share:
                    if timed is not None:
                        timed.calls.append([time.perf_counter()])
                    changed += await call()
                    if timed is not None:
                        timed.calls[-1].append(time.perf_counter())

            started = time.perf_counter()
            if movers == 1:
                await mover(calls)
            else:
                async with anyio.create_task_group() as group:
                    for n in range(movers):
                        group.start_soon(mover, calls[n::movers])
            seconds = time.perf_counter() - started
            reads = []
            for _ in range(50):
                before = time.perf_counter()
                order = await flex.order(TENANT)
                reads.append(time.perf_counter() - before)
    expected = [ids[n] for n in replay(range(holding), plan)] if movers == 1 else sorted(ids)
    if (order if movers == 1 else sorted(order)) != expected:
        raise RuntimeError("the holding queue's order disagrees with the list model")
    reads.sort()
    return FlexMoves(
        store=store,
        holding=holding,
        moves=moves,
        movers=movers,
        seconds=seconds,
        changed=changed,
        order_seconds=reads[len(reads) // 2],
    )


def _move_call(
    flex: flexq.FlexQueue, kind: MoveKind, job_id: flexq.JobId, ids: list[flexq.JobId], other: int
) -> functools.partial[Any]:
    if kind == "front":
        return functools.partial(flex.move_to_front, job_id)
    if kind == "before":
        return functools.partial(flex.move_before, job_id, ids[other])
    return functools.partial(flex.move_to, job_id, other)


class TimedSQLiteStore(SQLiteStore):
    """The SQLite store, counting and timing its batch calls and its database thread's work."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.awaited: dict[str, list[float]] = {}
        """Seconds each call of a store method was awaited, by method."""
        self.thread_seconds = 0.0
        self.calls: list[list[float]] = []
        """Per move: the caller's start, the transaction's start and end on the database
        thread, the caller's resumption (perf_counter times)."""

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await super()._run(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.thread_seconds += time.perf_counter() - started

    def _reorder(self, job_id: JobId, placement: Placement) -> bool:
        started = time.perf_counter()
        try:
            return super()._reorder(job_id, placement)
        finally:
            if self.calls:
                self.calls[-1] += [started, time.perf_counter()]

    async def _awaited(self, name: str, call: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.awaited.setdefault(name, []).append(time.perf_counter() - started)

    async def begin_batch(self, *args: Any) -> Any:
        return await self._awaited("begin_batch", super().begin_batch(*args))

    async def add_chunks(self, *args: Any) -> Any:
        return await self._awaited("add_chunks", super().add_chunks(*args))

    async def end_preparing(self, *args: Any) -> Any:
        return await self._awaited("end_preparing", super().end_preparing(*args))

    async def pending_chunks(self, *args: Any) -> Any:
        return await self._awaited("pending_chunks", super().pending_chunks(*args))

    async def checkpoint(self, *args: Any) -> Any:
        return await self._awaited("checkpoint", super().checkpoint(*args))

    async def batch_summary(self, *args: Any) -> Any:
        return await self._awaited("batch_summary", super().batch_summary(*args))


def profile(backend: str, items: int, moves: int, directory: Path) -> str:
    """Where a batch's and a move's time goes on SQLite, as text to print."""
    store = TimedSQLiteStore(str(directory / f"profile-{time.monotonic_ns()}.db"))
    run = anyio.run(batch_throughput, store, "sqlite", items, backend=backend)
    lines = [
        f"profile under {backend}: one batch of {items:,} items on SQLite,"
        f" {run.rate:,.0f} items/s over {run.total_seconds:.2f} s"
        f" (start {run.start_seconds:.2f} s, chunks {run.execute_seconds:.2f} s);"
        f" database thread busy {store.thread_seconds:.2f} s",
        f"  {'store call':<16}{'calls':>7}{'awaited ms':>12}{'ms a call':>11}",
    ]
    for name, seconds in store.awaited.items():
        lines.append(
            f"  {name:<16}{len(seconds):>7,}{sum(seconds) * 1e3:>12.1f}"
            f"{statistics.mean(seconds) * 1e3:>11.3f}"
        )
    store = TimedSQLiteStore(str(directory / f"profile-{time.monotonic_ns()}.db"))
    moved = anyio.run(flex_moves, store, "sqlite", moves, backend=backend)
    split = [call for call in store.calls if len(call) == 4]

    def median_us(first: int, second: int) -> float:
        return statistics.median(call[second] - call[first] for call in split) * 1e6

    lines += [
        f"{moves:,} moves one at a time: {moved.rate:,.0f} moves/s; per move (median):",
        f"  call until the transaction starts on the database thread {median_us(0, 1):>7.1f} us",
        f"  the transaction (SQLiteStore._reorder)                    {median_us(1, 2):>7.1f} us",
        f"  transaction's end until the caller runs again             {median_us(2, 3):>7.1f} us",
        f"  whole move                                                {median_us(0, 3):>7.1f} us",
        f"  whole move, mean (what the rate pays; a slow tail)        "
        f"{statistics.mean(call[3] - call[0] for call in split) * 1e6:>7.1f} us",
    ]
    return "\n".join(lines)


def url_for(store: str, directory: Path) -> str:
    """A fresh store of kind ``store`` (a new SQLite file in ``directory``)."""
    if store == "memory":
        return "memory://"
    return sqlite_url(str(directory / f"batch-{time.monotonic_ns()}.db"))


BATCH_HEADER = (
    f"  {'store':<8}{'backend':<9}{'items':>11}{'items/s':>12}{'start/s':>12}{'execute/s':>12}"
    f"{'s':>7}{'to final s':>12}{'RSS +MiB':>10}"
)
MOVES_HEADER = (
    f"  {'store':<8}{'backend':<9}{'holding':>8}{'movers':>8}{'moves':>8}{'moves/s':>10}"
    f"{'us/move':>9}{'order() ms':>12}"
)


def batch_row(backend: str, run: BatchThroughput) -> str:
    """One line of the batch table."""
    return (
        f"  {run.store:<8}{backend:<9}{run.items:>11,}{run.rate:>12,.0f}{run.start_rate:>12,.0f}"
        f"{run.execute_rate:>12,.0f}{run.total_seconds:>7.2f}{run.final_seconds:>12.2f}"
        f"{run.rss_growth_mb:>10.1f}"
    )


def moves_row(backend: str, moved: FlexMoves) -> str:
    """One line of the holding queue table."""
    return (
        f"  {moved.store:<8}{backend:<9}{moved.holding:>8}{moved.movers:>8}{moved.moves:>8,}"
        f"{moved.rate:>10,.0f}{1e6 / moved.rate:>9.1f}{moved.order_seconds * 1000:>12.3f}"
    )


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000, help="items of the batch")
    parser.add_argument("--moves", type=int, default=10_000, help="moves in the holding queue")
    parser.add_argument(
        "--movers", default="1,8", help="comma-separated counts of tasks issuing the moves"
    )
    parser.add_argument("--store", choices=["sqlite", "memory", "both"], default="both")
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument(
        "--profile", action="store_true", help="then show where the time goes on SQLite"
    )
    args = parser.parse_args()
    stores = ("sqlite", "memory") if args.store == "both" else (args.store,)
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    movers = [int(n) for n in args.movers.split(",")]
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="flexq-bench-") as directory:
        tmp = Path(directory)
        print(f"one batch job of {args.items:,} items, scope {SCOPE}, no-op execute")
        print(BATCH_HEADER)
        for store in stores:
            for backend in backends:
                run = anyio.run(
                    batch_throughput, url_for(store, tmp), store, args.items, backend=backend
                )
                print(batch_row(backend, run), flush=True)
        print(f"\n{args.moves:,} moves among 100 holding jobs")
        print(MOVES_HEADER)
        for store in stores:
            for backend in backends:
                for count in movers:
                    moved = anyio.run(
                        functools.partial(
                            flex_moves, url_for(store, tmp), store, args.moves, movers=count
                        ),
                        backend=backend,
                    )
                    print(moves_row(backend, moved), flush=True)
        if args.profile:
            for backend in backends:
                print()
                print(profile(backend, args.items, args.moves, tmp), flush=True)


if __name__ == "__main__":
    main()
