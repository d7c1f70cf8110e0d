"""The memory store: jobs in this process's memory, for tests and throwaway queues."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import TYPE_CHECKING

import anyio.lowlevel

from flexq._errors import DuplicateJob, InvalidArguments, JobNotFound, LimitExceeded, NotHolding
from flexq._limits import LimitTable
from flexq._models import JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import dumps, loads
from flexq._states import RUNNING_STATES, Kind, State, check_transition
from flexq._store.base import (
    ACTIVE_BATCH_STATES,
    BatchCounts,
    ChunkDone,
    ClaimedJob,
    DependentJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    NewJob,
    OnParentFailure,
    Outcome,
    Placement,
    Recovered,
    Renewal,
    ScheduleFiring,
    ScheduleRecord,
    WaitFacts,
    WorkerRecord,
    checked_outcomes,
    holding_full,
    job_info,
    lease_error,
    parent_failed_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence


@dataclasses.dataclass(slots=True)
class _Batch:
    prepared: bool = False
    total_items: int = 0
    chunks: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    """Chunks without a checkpoint: index -> (item count, JSON items)."""
    done: dict[int, ChunkDone] = dataclasses.field(default_factory=dict)

    def counts(self) -> BatchCounts:
        failed = [d for d in self.done.values() if d.error is not None]
        return BatchCounts(
            prepared=self.prepared,
            total_items=self.total_items,
            chunks_total=len(self.chunks) + len(self.done) if self.prepared else 0,
            items_processed=sum(d.items for d in self.done.values()),
            chunks_succeeded=len(self.done) - len(failed),
            chunks_failed=len(failed),
        )


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
    batch: _Batch | None = None
    callouts: int = 0

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
            batch=None if self.batch is None else self.batch.counts(), callouts=self.callouts,
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
        self._holding: dict[str, list[JobId]] = {}
        self._active: dict[str, int] = {}
        self._limits = LimitTable()
        self._workers: dict[str, WorkerRecord] = {}
        self._schedules: dict[str, ScheduleRecord] = {}
        self._children: dict[JobId, dict[JobId, OnParentFailure]] = {}
        """Parent -> its WAITING dependants and what they do if it does not complete."""
        self._parents: dict[JobId, set[JobId]] = {}
        """WAITING job -> the parents it still waits for."""
        self._finished: list[tuple[JobId, State]] = []
        self._releasing = False

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
        before = row.state
        row.move(state)
        if row.job.kind is Kind.BATCH:
            tenant = row.job.tenant
            if before is State.HOLDING:
                self._holding[tenant].remove(row.job.id)
            elif before in ACTIVE_BATCH_STATES:
                self._active[tenant] -= 1
                self._admit(tenant)
        row.finished_at = now
        row.lease_owner = None
        if row.job.key is not None and self._keys.get((row.job.tenant, row.job.key)) == row.job.id:
            del self._keys[(row.job.tenant, row.job.key)]
        self._release_dependants(row.job.id, state, now)

    def _held(self, owner: str, job_id: JobId) -> _Row | None:
        row = self._rows.get(job_id)
        if row is None or row.state not in RUNNING_STATES or row.lease_owner != owner:
            return None
        return row

    # -- enqueue ----------------------------------------------------------------------------

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        await anyio.lowlevel.checkpoint()
        return [self._enqueue_unit(unit, now) for unit in units]

    def _holding_refusal(self, batches: Sequence[NewJob]) -> LimitExceeded | None:
        """The error if the holding queues cannot take these new batch jobs (after the
        tenants' free active slots took what they can)."""
        counts: dict[str, int] = {}
        for job in batches:
            counts[job.tenant] = counts.get(job.tenant, 0) + 1
        for tenant, count in counts.items():
            limits = self._limits(tenant)
            holding = len(self._holding.get(tenant, ()))
            free = max(0, limits.max_active_batches - self._active.get(tenant, 0))
            if holding + count - min(free, holding + count) > limits.max_holding:
                return holding_full(tenant, limits.max_holding)
        return None

    def _hold(self, row: _Row) -> None:
        """Put a (new or released) batch job at the end of its tenant's holding queue."""
        if row.state is not State.HOLDING:
            row.move(State.HOLDING)
        self._holding.setdefault(row.job.tenant, []).append(row.job.id)
        self._admit(row.job.tenant)

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
        # Only new jobs take room in the holding queue: a duplicate returns its holder's id.
        refusal = self._holding_refusal([job for job in fresh if job.kind is Kind.BATCH])
        if refusal is not None:
            return refusal
        for job in fresh:
            if job.kind is Kind.BATCH:
                state = State.HOLDING
            else:
                state = State.QUEUED if job.run_at <= now else State.SCHEDULED
            row = _Row(seq=next(self._seq), job=job, state=state, created_at=now,
                       run_at=job.run_at)  # fmt: skip
            self._rows[job.id] = row
            if state is State.HOLDING:
                row.batch = _Batch()
                self._hold(row)
            elif state is State.QUEUED:
                self._make_ready(row)
            else:
                heapq.heappush(self._scheduled, (job.run_at, row.seq, job.id))
        self._keys.update(keys)
        return ids

    def _admit(self, tenant: str) -> bool:
        """Move the tenant's first HOLDING jobs into its free active slots."""
        holding = self._holding.get(tenant)
        limit = self._limits(tenant).max_active_batches
        admitted = False
        while holding and self._active.get(tenant, 0) < limit:
            row = self._rows[holding.pop(0)]
            row.move(State.QUEUED)
            self._make_ready(row)
            self._active[tenant] = self._active.get(tenant, 0) + 1
            admitted = True
        return admitted

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
        row.move(State.PREPARING if row.job.kind is Kind.BATCH else State.PROCESSING)
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
            row.callouts += outcome.callouts
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

    async def renew(self, owner: str, job_ids: Collection[JobId], lease_until: float) -> Renewal:
        await anyio.lowlevel.checkpoint()
        renewal = Renewal(aborted=[], lost=[])
        for job_id in dict.fromkeys(job_ids):
            row = self._rows.get(job_id)
            if row is None or row.state not in RUNNING_STATES or row.lease_owner != owner:
                renewal.lost.append(job_id)
                continue
            row.lease_until = lease_until
            if row.abort_requested:
                renewal.aborted.append(job_id)
        return renewal

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

    # -- batch jobs, the holding queue and active slots -------------------------------------

    def set_limits(self, limits: LimitTable) -> None:
        self._limits = limits

    async def admit(self, now: float) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return sorted(tenant for tenant in list(self._holding) if self._admit(tenant))

    async def holding_order(self, tenant: str) -> list[JobId]:
        await anyio.lowlevel.checkpoint()
        return list(self._holding.get(tenant, ()))

    def _holding_row(self, job_id: JobId) -> _Row:
        row = self._rows.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        if row.state is not State.HOLDING:
            raise NotHolding(job_id, row.state)
        return row

    async def reorder(self, job_id: JobId, placement: Placement) -> bool:
        await anyio.lowlevel.checkpoint()
        row = self._holding_row(job_id)
        order = self._holding[row.job.tenant]
        rest = [other for other in order if other != job_id]
        if placement.to == "front":
            index = 0
        elif placement.to == "end":
            index = len(rest)
        elif placement.to == "index":
            index = min(placement.place, len(rest))
        else:
            other = self._holding_row(placement.other or "")
            if other.job.tenant != row.job.tenant:
                raise InvalidArguments(
                    f"job {placement.other!r} is in tenant {other.job.tenant!r}'s holding queue,"
                    f" not {row.job.tenant!r}'s"
                )
            if placement.other == job_id:
                raise InvalidArguments(f"cannot move job {job_id!r} {placement.to} itself")
            index = rest.index(other.job.id) + (placement.to == "after")
        rest.insert(index, job_id)
        changed = rest != order
        order[:] = rest
        return changed

    async def usage(self, tenant: str) -> tuple[int, int]:
        await anyio.lowlevel.checkpoint()
        return len(self._holding.get(tenant, ())), self._active.get(tenant, 0)

    async def wait_facts(self, job_id: JobId) -> WaitFacts:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        tenant = row.job.tenant
        holding = self._holding.get(tenant, [])
        ready_ahead = tenants_ahead = 0
        if row.state is State.QUEUED:
            # Suspects run alone (claim_suspect), not in turn: as in the SQLite store.
            queued = [r for r in self._rows.values()
                      if r.state is State.QUEUED and not r.lease_expiries]  # fmt: skip
            ready_ahead = sum(r.job.tenant == tenant and r.order < row.order for r in queued)
            tenants_ahead = len({r.job.tenant for r in queued} - {tenant})
        return WaitFacts(
            info=row.info(),
            holding_position=holding.index(job_id) if row.state is State.HOLDING else None,
            holding=len(holding),
            active_batches=self._active.get(tenant, 0),
            ready_ahead=ready_ahead,
            tenants_ahead=tenants_ahead,
            pauses=tuple(await self.pauses()),
        )

    def _held_batch(self, owner: str, job_id: JobId) -> _Batch | None:
        row = self._held(owner, job_id)
        return None if row is None else row.batch

    async def begin_batch(self, owner: str, job_id: JobId) -> BatchCounts | None:
        await anyio.lowlevel.checkpoint()
        row = self._held(owner, job_id)
        if row is None or row.batch is None:
            return None
        if row.batch.prepared:
            if row.state is State.PREPARING:
                row.move(State.PROCESSING)
        else:
            row.batch = _Batch()
        return row.batch.counts()

    async def add_chunks(
        self, owner: str, job_id: JobId, first: int, chunks: Sequence[tuple[int, str]]
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        batch = self._held_batch(owner, job_id)
        if batch is None:
            return False
        for offset, chunk in enumerate(chunks):
            batch.chunks[first + offset] = chunk
        return True

    async def end_preparing(
        self, owner: str, job_id: JobId, total_items: int, chunks_total: int
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        row = self._held(owner, job_id)
        if row is None or row.batch is None:
            return False
        row.batch.prepared = True
        row.batch.total_items = total_items
        row.move(State.PROCESSING)
        return True

    async def pending_chunks(self, job_id: JobId, after: int, limit: int) -> list[tuple[int, str]]:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None or row.batch is None:
            return []
        indexes = sorted(i for i in row.batch.chunks if i > after)[:limit]
        return [(i, row.batch.chunks[i][1]) for i in indexes]

    async def checkpoint(self, owner: str, job_id: JobId, done: Sequence[ChunkDone]) -> bool:
        await anyio.lowlevel.checkpoint()
        batch = self._held_batch(owner, job_id)
        if batch is None:
            return False
        for chunk in done:
            if batch.chunks.pop(chunk.chunk, None) is not None:
                batch.done[chunk.chunk] = chunk
        return True

    async def batch_summary(self, job_id: JobId) -> tuple[BatchCounts, list[tuple[int, str]]]:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None or row.batch is None:
            raise JobNotFound(job_id)
        batch = row.batch
        errors = sorted((d.chunk, d.error) for d in batch.done.values() if d.error is not None)
        return batch.counts(), errors

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRecord, now: float) -> ScheduleRecord:
        await anyio.lowlevel.checkpoint()
        old = self._schedules.get(schedule.name)
        if old is None:
            stored = schedule._replace(revision=1, created_at=now)
        else:
            same_times = (old.cron, old.timezone) == (schedule.cron, schedule.timezone)
            stored = schedule._replace(
                state=old.state,
                next_fire_time=old.next_fire_time if same_times else schedule.next_fire_time,
                previous_fire_time=old.previous_fire_time,
                times_triggered=old.times_triggered,
                last_job_id=old.last_job_id,
                revision=old.revision + 1,
                created_at=old.created_at,
            )
        self._schedules[schedule.name] = stored
        return stored

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        await anyio.lowlevel.checkpoint()
        return self._schedules.get(name)

    async def list_schedules(self, tenant: str | None) -> list[ScheduleRecord]:
        await anyio.lowlevel.checkpoint()
        return [
            record
            for _, record in sorted(self._schedules.items())
            if tenant is None or record.tenant == tenant
        ]

    async def due_schedules(
        self, tasks: Collection[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        await anyio.lowlevel.checkpoint()
        due: list[ScheduleRecord] = []
        later: float | None = None
        for record in self._schedules.values():
            moment = record.next_fire_time
            if record.state != "active" or moment is None:
                continue
            if moment <= now:
                if record.task in tasks:
                    due.append(record)
            elif later is None or moment < later:
                later = moment
        due.sort(key=lambda record: (record.next_fire_time, record.name))
        return due, later

    async def fire_schedule(
        self,
        name: str,
        revision: int,
        firing: ScheduleFiring,
        jobs: Sequence[NewJob],
        now: float,
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        record = self._schedules.get(name)
        if record is None or record.revision != revision or record.state != "active":
            return False
        self._schedules[name] = record._replace(
            next_fire_time=firing.next_fire_time,
            previous_fire_time=record.previous_fire_time
            if firing.previous_fire_time is None
            else firing.previous_fire_time,
            times_triggered=record.times_triggered + len(jobs),
            last_job_id=record.last_job_id if firing.last_job_id is None else firing.last_job_id,
            revision=revision + 1,
        )
        if jobs:
            self._enqueue_unit(EnqueueUnit(jobs, "raise"), now)
        return True

    async def set_schedule_state(
        self, name: str, revision: int, state: str, next_fire_time: float | None
    ) -> ScheduleRecord | None:
        await anyio.lowlevel.checkpoint()
        record = self._schedules.get(name)
        if record is None or record.revision != revision:
            return None
        stored = record._replace(state=state, next_fire_time=next_fire_time, revision=revision + 1)
        self._schedules[name] = stored
        return stored

    async def delete_schedule(self, name: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return self._schedules.pop(name, None) is not None

    # -- dependencies and chains -------------------------------------------------------------

    async def enqueue_dependent(self, jobs: Sequence[DependentJob], now: float) -> list[JobId]:
        await anyio.lowlevel.checkpoint()
        known = set(self._rows)
        refusal = self._holding_refusal(
            [d.job for d in jobs if d.job.kind is Kind.BATCH and self._released_at_once(d)]
        )
        if refusal is not None:
            raise refusal
        for dependent in jobs:
            for parent in dependent.parents:
                if parent not in known:
                    raise JobNotFound(parent)
            known.add(dependent.job.id)
        for dependent in jobs:
            self._insert_dependent(dependent, now)
        return [dependent.job.id for dependent in jobs]

    def _released_at_once(self, dependent: DependentJob) -> bool:
        """Whether every parent already ended so that the job is not held back."""
        parents = [self._rows.get(parent) for parent in dependent.parents]
        return all(
            row is not None
            and row.state.is_final
            and (row.state is State.COMPLETED or dependent.on_parent_failure == "run")
            for row in parents
        )

    def _insert_dependent(self, dependent: DependentJob, now: float) -> None:
        job = dependent.job
        waiting: set[JobId] = set()
        failed: _Row | None = None
        for parent_id in dependent.parents:
            parent = self._rows[parent_id]
            if not parent.state.is_final:
                waiting.add(parent_id)
            elif parent.state is not State.COMPLETED and dependent.on_parent_failure == "abort":
                failed = failed or parent
        state = State.QUEUED if job.run_at <= now else State.SCHEDULED
        if failed is not None:
            state = State.ABORTED
        elif waiting:
            state = State.WAITING
        if job.kind is Kind.BATCH and state in (State.QUEUED, State.SCHEDULED):
            state = State.HOLDING
        row = _Row(seq=next(self._seq), job=job, state=state, created_at=now, run_at=job.run_at)
        self._rows[job.id] = row
        if job.kind is Kind.BATCH:
            row.batch = _Batch()
        if state is State.HOLDING:
            self._hold(row)
        elif failed is not None:
            row.errors.append(parent_failed_error(failed.job.id, failed.state, now))
            row.finished_at = now
        elif waiting:
            self._parents[job.id] = waiting
            for parent_id in waiting:
                self._children.setdefault(parent_id, {})[job.id] = dependent.on_parent_failure
        elif state is State.QUEUED:
            self._make_ready(row)
        else:
            heapq.heappush(self._scheduled, (job.run_at, row.seq, job.id))

    def _release_dependants(self, job_id: JobId, state: State, now: float) -> None:
        """Release or abort the dependants of a job that just became final."""
        self._finished.append((job_id, state))
        if self._releasing:  # a dependant aborted below: its own dependants wait their turn
            return
        self._releasing = True
        try:
            while self._finished:
                parent_id, parent_state = self._finished.pop()
                self._parents.pop(parent_id, None)
                for child_id, policy in self._children.pop(parent_id, {}).items():
                    self._release_child(child_id, parent_id, parent_state, policy, now)
        finally:
            self._releasing = False

    def _release_child(
        self,
        child_id: JobId,
        parent_id: JobId,
        parent_state: State,
        policy: OnParentFailure,
        now: float,
    ) -> None:
        row = self._rows.get(child_id)
        waiting = self._parents.get(child_id)
        if row is None or row.state is not State.WAITING or waiting is None:
            return
        waiting.discard(parent_id)
        if parent_state is not State.COMPLETED and policy == "abort":
            for other in waiting:
                self._children.get(other, {}).pop(child_id, None)
            row.errors.append(parent_failed_error(parent_id, parent_state, now))
            self._finish(row, State.ABORTED, now)
        elif not waiting:
            del self._parents[child_id]
            if row.job.kind is Kind.BATCH:
                self._hold(row)
                return
            target = State.QUEUED if row.run_at <= now else State.SCHEDULED
            self._set_waiting(row, target, row.run_at)

    async def claim_jobs(
        self,
        owner: str,
        job_ids: Collection[JobId],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        await anyio.lowlevel.checkpoint()
        runnable = self._runnable(tasks)
        claimed = []
        for job_id in job_ids:
            row = self._rows.get(job_id)
            if (
                row is not None
                and row.state is State.QUEUED
                and not row.lease_expiries
                and row.job.task in runnable
                and (PauseScope.TENANT, row.job.tenant) not in self._pauses
            ):
                claimed.append(self._take(row, owner, now, lease_until))
        return claimed

    async def waiting_for(self, job_id: JobId) -> list[JobId]:
        await anyio.lowlevel.checkpoint()
        if job_id not in self._rows:
            raise JobNotFound(job_id)
        return sorted(self._parents.get(job_id, ()))

    async def chain(self, job_id: JobId) -> list[JobInfo]:
        await anyio.lowlevel.checkpoint()
        row = self._rows.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        found = {job_id: row}
        parent = self._rows.get(row.job.parent_id) if row.job.parent_id else None
        while parent is not None and parent.job.id not in found:
            found[parent.job.id] = parent
            parent = self._rows.get(parent.job.parent_id) if parent.job.parent_id else None
        children: dict[JobId, list[_Row]] = {}
        for other in self._rows.values():
            if other.job.parent_id is not None:
                children.setdefault(other.job.parent_id, []).append(other)
        todo = [job_id]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child.job.id not in found:
                    found[child.job.id] = child
                    todo.append(child.job.id)
        return [r.info() for r in sorted(found.values(), key=lambda r: r.seq)]

    # -- worker processes -------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        await anyio.lowlevel.checkpoint()
        self._workers[worker.id] = worker

    async def remove_worker(self, worker_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._workers.pop(worker_id, None)

    async def list_workers(self) -> list[WorkerRecord]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._workers.values(), key=lambda worker: (worker.started_at, worker.id))

    async def prune_workers(self, seen_before: float) -> int:
        await anyio.lowlevel.checkpoint()
        gone = [w.id for w in self._workers.values() if w.last_seen < seen_before]
        for worker_id in gone:
            del self._workers[worker_id]
        return len(gone)


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
