"""Claim cost against the number of waiting jobs, measured on the SQLite store directly."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import TYPE_CHECKING

from benchmarks._common import FILL_TENANTS, NOOP_TASK, fill
from flexq._states import State
from flexq._store.base import Outcome
from flexq._store.sqlite import SQLiteStore, claim_sql

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

OWNER = "bench-claimer"
LEASE = 30.0
BUDGET = 5.0
"""Seconds a slow measurement may take before it stops with the samples it has."""
FOREIGN_TASK = "bench.not-registered-here"
"""A task no waiting job belongs to: a process that runs other tasks than the waiting ones."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimCost:
    """Per-call times (seconds) of the dispatcher's store calls with ``waiting`` jobs queued."""

    waiting: int
    batch: int
    claim: list[float]
    """``await store.claim(...)`` of ``batch`` jobs of one tenant (round trip included)."""
    claim_sql: list[float]
    """The same transaction run directly on the connection, without the thread hop."""
    ready_tenants: list[float]
    has_suspects: list[float]
    promote: list[float]
    claim_foreign: list[float]
    """A claim that finds nothing: the waiting jobs are all of a task this process lacks."""
    fill_seconds: float
    plan: list[str]

    @staticmethod
    def ms(samples: list[float]) -> float:
        """The median of ``samples`` in milliseconds."""
        return statistics.median(samples) * 1000


async def query_plan(store: SQLiteStore, tenant: str, batch: int) -> list[str]:
    """EXPLAIN QUERY PLAN of the claim statement, one line per plan step."""
    now = time.time()
    sql = "EXPLAIN QUERY PLAN " + claim_sql(1)
    rows = await store._run(store._select, sql, (now, OWNER, now + LEASE, tenant, batch, NOOP_TASK))
    return [f"{'  ' * _depth(rows, row)}{row[3]}" for row in rows]


def _depth(rows: list[tuple[object, ...]], row: tuple[object, ...]) -> int:
    parents = {r[0]: r[1] for r in rows}
    depth, parent = 0, row[1]
    while parent in parents:
        depth, parent = depth + 1, parents[parent]
    return depth


async def measure(
    path: str, waiting: int, *, rounds: int = 200, batch: int = 8, prefilled: bool = False
) -> ClaimCost:
    """Fill ``path`` with ``waiting`` jobs (plus what the rounds take) unless ``prefilled``.

    Then time ``rounds`` claims of ``batch`` jobs, each followed (untimed) by reporting them
    COMPLETED as a worker would, so that the waiting count stays at or above ``waiting``.
    """
    store = SQLiteStore(path)
    await store.open()
    try:
        fill_seconds = 0.0 if prefilled else await fill(store, waiting + 2 * rounds * batch)
        claim = await _claims(store, rounds, batch, direct=False)
        direct = await _claims(store, rounds, batch, direct=True)
        ready = await _timed(rounds, lambda: store.ready_tenants({NOOP_TASK}))
        suspects = await _timed(rounds, lambda: store.has_suspects({NOOP_TASK}))
        promote = await _timed(rounds, lambda: store.promote(time.time()))
        foreign = await _timed(
            rounds,
            lambda: store.claim(
                OWNER, {"t0": batch}, {FOREIGN_TASK}, time.time(), time.time() + LEASE
            ),
        )
        plan = await query_plan(store, "t0", batch)
    finally:
        await store.close()
    return ClaimCost(
        waiting=waiting,
        batch=batch,
        claim=claim,
        claim_sql=direct,
        ready_tenants=ready,
        has_suspects=suspects,
        promote=promote,
        claim_foreign=foreign,
        fill_seconds=fill_seconds,
        plan=plan,
    )


async def _claims(store: SQLiteStore, rounds: int, batch: int, *, direct: bool) -> list[float]:
    tasks = {NOOP_TASK}
    seconds = []
    for i in range(rounds):
        wanted = {f"t{i % FILL_TENANTS}": batch}
        now = time.time()
        before = time.perf_counter()
        if direct:
            jobs = store._claim(OWNER, wanted, tasks, now, now + LEASE)
        else:
            jobs = await store.claim(OWNER, wanted, tasks, now, now + LEASE)
        seconds.append(time.perf_counter() - before)
        assert len(jobs) == batch, f"claimed {len(jobs)} of {batch}"
        done = [Outcome(job.id, State.COMPLETED, result="null") for job in jobs]
        await store.report(OWNER, done, time.time())
    return seconds


async def _timed(
    rounds: int, call: Callable[[], Awaitable[object]], budget: float = BUDGET
) -> list[float]:
    """Time ``call`` ``rounds`` times, or fewer (at least 3) once ``budget`` seconds are spent."""
    seconds: list[float] = []
    while len(seconds) < rounds and (len(seconds) < 3 or sum(seconds) < budget):
        before = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - before)
    return seconds
