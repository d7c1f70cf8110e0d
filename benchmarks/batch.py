"""Batch jobs: items through start, execute and finish; and moves in the holding queue.

``python -m benchmarks.batch [--items N] [--moves N] [--store sqlite|memory|both]
[--backend asyncio|trio|both]`` runs this case alone; ``python -m benchmarks.run`` runs it as
case 7.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

import flexq
from benchmarks._common import quiet_logs, rate, rss_mb, sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

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
    url: str, store: str, items: int, *, scope: int = SCOPE, timeout: float = 600.0
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
    url: str,
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

            async def mover(share: Sequence[functools.partial[Any]]) -> None:
                nonlocal changed
                for call in share:
                    changed += await call()

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


if __name__ == "__main__":
    main()
