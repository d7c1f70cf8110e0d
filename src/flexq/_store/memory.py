"""The memory store: jobs in this process's memory, for tests and throwaway queues."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import TYPE_CHECKING

import anyio.lowlevel

from flexq._errors import DuplicateJob, JobNotFound
from flexq._models import JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import dumps, loads
from flexq._states import RUNNING_STATES, Kind, State, check_transition
from flexq._store.base import (
    ClaimedJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    NewJob,
    Outcome,
    Recovered,
    checked_outcomes,
    job_info,
    lease_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence


@dataclasses.dataclass(slots=True)
class _Row:
    seq: int
    job: NewJob
    state: State
    created_at: float
    run_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None
    errors: list[dict[str, object]] = dataclasses.field(default_factory=list)
    progress: str | None = None
    lease_owner: str | None = None
    lease_until: float = 0.0
    lease_expiries: int = 0
    abort_requested: bool = False

    @property
    def order(self) -> tuple[int, int, int]:
        return (-self.job.priority, self.job.kind.rank, self.seq)

    def move(self, target: State) -> None:
        check_transition(self.state, target, self.job.id)
        self.state = target

    def info(self) -> JobInfo:
        job = self.job
        return job_info(
            id=job.id, task=job.task, kind=job.kind, tenant=job.tenant, priority=job.priority,
            state=self.state, args=job.args, kwargs=job.kwargs, attempts=self.attempts,
            max_attempts=job.max_attempts, created_at=self.created_at, run_at=self.run_at,
            started_at=self.started_at, finished_at=self.finished_at, result=self.result,
            errors=dumps(self.errors, "errors") if self.errors else None,
            parent_id=job.parent_id, key=job.key, progress=self.progress,
            abort_requested=self.abort_requested,
        )  # fmt: skip


class MemoryStore:
    """Jobs in a dict, with per-tenant ready heaps: fast, and gone with the process."""

    def __init__(self) -> None:
        self._rows: dict[JobId, _Row] = {}
        self._seq = itertools.count(1)
        self._ready: dict[str, list[tuple[tuple[int, int, int], JobId]]] = {}
        self._scheduled: list[tuple[float, int, JobId]] = []
        self._keys: dict[tuple[str, str], JobId] = {}
        self._pauses: dict[tuple[PauseScope, str], float] = {}

    def __repr__(self) -> str:
        return "MemoryStore()"

    async def open(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        await anyio.lowlevel.checkpoint()

    # -- helpers ----------------------------------------------------------------------------

    def _make_ready(self, row: _Row) -> None:
        heapq.heappush(self._ready.setdefault(row.job.tenant, []), (row.order, row.job.id))

    def _set_waiting(self, row: _Row, state: State, run_at: float) -> None:
        row.move(state)
        row.run_at = run_at
        if state is State.QUEUED:
            self._make_ready(row)
        else:
            heapq.heappush(self._scheduled, (run_at, row.seq, row.job.id))

    def _finish(self, row: _Row, state: State, now: float) -> None:
        row.move(state)
        row.finished_at = now
        row.lease_owner = None
        if row.job.key is not None and self._keys.get((row.job.tenant, row.job.key)) == row.job.id:
            del self._keys[(row.job.tenant, row.job.key)]

    def _held(self, owner: str, job_id: JobId) -> _Row | None:
        row = self._rows.get(job_id)
        if row is None or row.state not in RUNNING_STATES or row.lease_owner != owner:
            return None
        return row

    # -- enqueue ----------------------------------------------------------------------------

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        await anyio.lowlevel.checkpoint()
        return [self._enqueue_unit(unit, now) for unit in units]

    def _enqueue_unit(self, unit: EnqueueUnit, now: float) -> EnqueueResult:
        ids: list[JobId] = []
        fresh: list[NewJob] = []
        keys: dict[tuple[str, str], JobId] = {}
        for job in unit.jobs:
            if job.key is not None:
                existing = self._keys.get((job.tenant, job.key)) or keys.get((job.tenant, job.key))
                if existing is not None:
                    if unit.on_duplicate == "raise":
                        return DuplicateJob(job.tenant, job.key, existing)
                    ids.append(existing)
                    continue
                keys[(job.tenant, job.key)] = job.id
            fresh.append(job)
            ids.append(job.id)
        for job in fresh:
            state = State.QUEUED if job.run_at <= now else State.SCHEDULED
            row = _Row(seq=next(self._seq), job=job, state=state, created_at=now,
                       run_at=job.run_at)  # fmt: skip
            self._rows[job.id] = row
            if state is State.QUEUED:
                self._make_ready(row)
            else:
                heapq.heappush(self._scheduled, (job.run_at, row.seq, job.id))
        self._keys.update(keys)
        return ids

    # -- dispatching ------------------------------------------------------------------------

    async def ready_tenants(self, tasks: Collection[str]) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return sorted(
            tenant
            for tenant, heap in self._ready.items()
            if any(
                self._is_ready_entry(entry) and self._rows[entry[1]].job.task in tasks
                for entry in heap
            )
        )

    def _is_ready_entry(self, entry: tuple[tuple[int, int, int], JobId]) -> bool:
        row = self._rows.get(entry[1])
        return (
            row is not None
            and row.state is State.QUEUED
            and row.order == entry[0]
            and not row.lease_expiries
        )

    async def claim(
        self,
        owner: str,
        wanted: Mapping[str, int],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        await anyio.lowlevel.checkpoint()
        runnable = self._runnable(tasks)
        claimed: list[ClaimedJob] = []
        for tenant, count in wanted.items():
            if (PauseScope.TENANT, tenant) in self._pauses:
                continue
            heap = self._ready.get(tenant, [])
            skipped: list[tuple[tuple[int, int, int], JobId]] = []
            taken = 0
            while heap and taken < count:
                entry = heapq.heappop(heap)
                if not self._is_ready_entry(entry):
                    continue
                row = self._rows[entry[1]]
                if row.job.task not in runnable:
                    skipped.append(entry)
                    continue
                claimed.append(self._take(row, owner, now, lease_until))
                taken += 1
            for entry in skipped:
                heapq.heappush(heap, entry)
        return claimed

    def _runnable(self, tasks: Collection[str]) -> set[str]:
        if (PauseScope.QUEUE, "") in self._pauses:
            return set()
        return set(tasks) - {name for scope, name in self._pauses if scope is PauseScope.TASK}

    @staticmethod
    def _take(row: _Row, owner: str, now: float, lease_until: float) -> ClaimedJob:
        row.move(State.PROCESSING)
        row.attempts += 1
        row.started_at = now
        row.lease_owner = owner
        row.lease_until = lease_until
        return _claimed(row)

    def _suspects(self) -> list[_Row]:
        return [r for r in self._rows.values() if r.state is State.QUEUED and r.lease_expiries]

    async def has_suspects(self, tasks: Collection[str]) -> bool:
        await anyio.lowlevel.checkpoint()
        return self._first_suspect(tasks) is not None

    def _first_suspect(self, tasks: Collection[str]) -> _Row | None:
        runnable = self._runnable(tasks)
        for row in self._suspects():
            if row.job.task in runnable and (PauseScope.TENANT, row.job.tenant) not in self._pauses:
                return row
        return None

    async def claim_suspect(
        self, owner: str, tasks: Collection[str], now: float, lease_until: float
    ) -> ClaimedJob | None:
        await anyio.lowlevel.checkpoint()
        row = self._first_suspect(tasks)
        return None if row is None else self._take(row, owner, now, lease_until)

    async def report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[JobId]:
        await anyio.lowlevel.checkpoint()
        written: list[JobId] = []
        for outcome in checked_outcomes(outcomes):
            row = self._held(owner, outcome.job_id)
            if row is None:
                continue
            if outcome.error is not None:
                row.errors.append(loads(outcome.error))
            row.lease_owner = None
            if outcome.release:
                row.attempts -= 1
                if row.abort_requested:
                    self._finish(row, State.ABORTED, now)
                else:
                    self._set_waiting(row, State.QUEUED, row.run_at)
            elif outcome.state in (State.QUEUED, State.SCHEDULED):
                self._set_waiting(row, outcome.state, outcome.run_at)  # type: ignore[arg-type]
            else:
                row.result = outcome.result
                self._finish(row, outcome.state, now)
            written.append(outcome.job_id)
        return written

    async def renew(self, owner: str, lease_until: float) -> list[JobId]:
        await anyio.lowlevel.checkpoint()
        aborted = []
        for row in self._rows.values():
            if row.state in RUNNING_STATES and row.lease_owner == owner:
                row.lease_until = lease_until
                if row.abort_requested:
                    aborted.append(row.job.id)
        return aborted

    async def recover(self, now: float, max_lease_expiries: int) -> Recovered:
        await anyio.lowlevel.checkpoint()
        recovered = Recovered(requeued=[], failed=[], aborted=[])
        expired = [r for r in self._rows.values()
                   if r.state in RUNNING_STATES and r.lease_until < now]  # fmt: skip
        for row in expired:
            row.lease_expiries += 1
            row.lease_owner = None
            row.errors.append(
                lease_error(row.attempts, row.lease_expiries, max_lease_expiries, now)
            )
            if row.abort_requested:
                self._finish(row, State.ABORTED, now)
                recovered.aborted.append(row.job.id)
            elif row.lease_expiries >= max_lease_expiries:
                self._finish(row, State.FAILED, now)
                recovered.failed.append(row.job.id)
            else:
                self._set_waiting(row, State.QUEUED, row.run_at)
                recovered.requeued.append(row.job.id)
        return recovered

    async def promote(self, now: float) -> tuple[list[str], float | None]:
        await anyio.lowlevel.checkpoint()
        tenants: set[str] = set()
        while self._scheduled and self._scheduled[0][0] <= now:
            run_at, _, job_id = heapq.heappop(self._scheduled)
            row = self._rows.get(job_id)
            if row is None or row.state is not State.SCHEDULED or row.run_at != run_at:
                continue
            self._set_waiting(row, State.QUEUED, run_at)
            tenants.add(row.job.tenant)
        while self._scheduled:
            run_at, _, job_id = self._scheduled[0]
            row = self._rows.get(job_id)
            if row is not None and row.state is State.SCHEDULED and row.run_at == run_at:
                return sorted(tenants), run_at
            heapq.heappop(self._scheduled)
        return sorted(tenants), None

    # -- control ----------------------------------------------------------------------------

    async def request_abort(self, job_id: JobId, now: float) -> State:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        if row.state in RUNNING_STATES:
            row.abort_requested = True
            return row.state
        check_transition(row.state, State.ABORTED, job_id)
        row.abort_requested = True
        self._finish(row, State.ABORTED, now)
        return State.ABORTED

    async def set_progress(self, owner: str, job_id: JobId, progress: str) -> bool:
        await anyio.lowlevel.checkpoint()
        row = self._held(owner, job_id)
        if row is None:
            return False
        row.progress = progress
        return True

    async def set_pause(self, scope: PauseScope, name: str, paused: bool, now: float) -> bool:
        await anyio.lowlevel.checkpoint()
        present = (scope, name) in self._pauses
        if paused and not present:
            self._pauses[(scope, name)] = now
        elif not paused and present:
            del self._pauses[(scope, name)]
        return paused != present

    async def pauses(self) -> list[Pause]:
        await anyio.lowlevel.checkpoint()
        return [
            Pause(scope, name, timestamp_to_datetime(since))
            for (scope, name), since in sorted(self._pauses.items(), key=lambda i: i[1])
        ]

    async def prune(self, finished_before: float, limit: int) -> int:
        await anyio.lowlevel.checkpoint()
        finished = sorted(
            (row.finished_at, row.seq, job_id)
            for job_id, row in self._rows.items()
            if row.state.is_final and row.finished_at is not None
            and row.finished_at < finished_before
        )  # fmt: skip
        for _, _, job_id in finished[:limit]:
            del self._rows[job_id]
        return len(finished[:limit])

    async def listen(
        self,
        wake: Callable[[list[str] | None, float | None], None],
        free_workers: Callable[[], int],
    ) -> None:
        await anyio.sleep_forever()

    # -- queries ----------------------------------------------------------------------------

    async def get(self, job_id: JobId) -> JobInfo:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row.info()

    async def get_many(self, job_ids: Sequence[JobId]) -> list[JobInfo]:
        await anyio.lowlevel.checkpoint()
        return [self._rows[i].info() for i in dict.fromkeys(job_ids) if i in self._rows]

    async def jobs(
        self, where: JobFilter, *, after_seq: int | None, offset: int, limit: int
    ) -> list[tuple[int, JobInfo]]:
        await anyio.lowlevel.checkpoint()
        rows = (r for r in self._rows.values() if _matches(r, where))
        if after_seq is not None:
            rows = (r for r in rows if r.seq > after_seq)
        return [(r.seq, r.info()) for r in itertools.islice(rows, offset, offset + limit)]

    async def counts(self, where: JobFilter) -> dict[State, int]:
        await anyio.lowlevel.checkpoint()
        counts: dict[State, int] = {}
        for row in self._rows.values():
            if _matches(row, where):
                counts[row.state] = counts.get(row.state, 0) + 1
        return counts


def _claimed(row: _Row) -> ClaimedJob:
    job = row.job
    return ClaimedJob(
        id=job.id, task=job.task, kind=job.kind, tenant=job.tenant, priority=job.priority,
        args=job.args, kwargs=job.kwargs, attempt=row.attempts, max_attempts=job.max_attempts,
        timeout=job.timeout, parent_id=job.parent_id, order=row.order,
    )  # fmt: skip


def _matches(row: _Row, where: JobFilter) -> bool:
    job = row.job
    return (
        (where.tenant is None or job.tenant == where.tenant)
        and (where.state is None or row.state is where.state)
        and (where.kind is None or job.kind is Kind(where.kind))
        and (where.task is None or job.task == where.task)
        and (where.created_after is None or row.created_at >= where.created_after)
        and (where.created_before is None or row.created_at < where.created_before)
    )
