"""The store protocol and the records that cross it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from flexq._errors import DuplicateJob, InvalidArguments, LimitExceeded
from flexq._models import (
    BatchProgress,
    JobError,
    JobId,
    JobInfo,
    Pause,
    PauseScope,
    timestamp_to_datetime,
)
from flexq._serialize import loads
from flexq._states import Kind, State, check_transition

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from flexq._limits import LimitTable

OnDuplicate = Literal["raise", "return"]


class NewJob(NamedTuple):
    """A validated job, serialized and ready to insert."""

    id: JobId
    task: str
    kind: Kind
    tenant: str
    priority: int
    args: str
    """JSON list."""
    kwargs: str
    """JSON object."""
    max_attempts: int
    timeout: float | None
    run_at: float
    key: str | None
    parent_id: JobId | None


@dataclasses.dataclass(frozen=True, slots=True)
class EnqueueUnit:
    """Jobs that one caller enqueues: they are inserted all together or not at all."""

    jobs: Sequence[NewJob]
    on_duplicate: OnDuplicate


EnqueueResult = list[JobId] | DuplicateJob | LimitExceeded
"""Per unit: the ids (an existing job's id where a key matched and on_duplicate is "return"),
or the error (a duplicate key, a full holding queue) that kept the unit from being written."""


class ClaimedJob(NamedTuple):
    """A job that a worker now holds a lease on."""

    id: JobId
    task: str
    kind: Kind
    tenant: str
    priority: int
    args: str
    kwargs: str
    attempt: int
    max_attempts: int
    timeout: float | None
    parent_id: JobId | None
    order: tuple[int, int, int]
    """Sort key inside a tenant: (-priority, kind rank, creation sequence)."""


class Outcome(NamedTuple):
    """How an attempt ended, to be written by :meth:`Store.report`.

    ``state`` is the job's next state: COMPLETED, FAILED, ABORTED, or back to SCHEDULED/QUEUED
    for a retry (``error`` set) or a release at shutdown (``release``: the attempt is not
    counted).
    """

    job_id: JobId
    state: State
    result: str | None = None
    error: str | None = None
    """JSON object of the attempt's error."""
    run_at: float | None = None
    release: bool = False
    callouts: int = 0
    """HTTP requests the attempt made through ``ctx.http``: added to the job's count."""


@dataclasses.dataclass(frozen=True, slots=True)
class Recovered:
    """Jobs whose lease expired, by where they went."""

    requeued: list[JobId]
    failed: list[JobId]
    aborted: list[JobId]


@dataclasses.dataclass(frozen=True, slots=True)
class Renewal:
    """What :meth:`Store.renew` found of the jobs it was given."""

    aborted: list[JobId]
    """Jobs renewed whose abort was requested."""
    lost: list[JobId]
    """Jobs no longer running under the owner's lease: another process recovered them (and may
    run them now), or they ended."""


class Placement(NamedTuple):
    """Where :meth:`Store.reorder` puts a holding job in its tenant's holding queue."""

    to: Literal["front", "end", "before", "after", "index"]
    other: JobId | None = None
    """The job to go before or after."""
    place: int = 0
    """The 0-based place to go to (``to="index"``); past the end means last."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchCounts:
    """A batch job's chunk bookkeeping."""

    prepared: bool
    """Whether ``start`` committed all its items."""
    total_items: int
    chunks_total: int
    items_processed: int
    chunks_succeeded: int
    chunks_failed: int

    def progress(self) -> BatchProgress:
        """The public view of these counts."""
        return BatchProgress(
            items_processed=self.items_processed,
            total_items=self.total_items,
            errors=self.chunks_failed,
            chunks_total=self.chunks_total,
            chunks_succeeded=self.chunks_succeeded,
            chunks_failed=self.chunks_failed,
        )


NO_BATCH_COUNTS = BatchCounts(False, 0, 0, 0, 0, 0)


class ChunkDone(NamedTuple):
    """How one chunk of a batch ended: a checkpoint."""

    chunk: int
    items: int
    error: str | None = None
    """JSON error record of its last try, if every try failed."""


@dataclasses.dataclass(frozen=True, slots=True)
class WaitFacts:
    """What the store knows about why a job waits (see :meth:`flexq.Queue.explain`)."""

    info: JobInfo
    holding_position: int | None
    """0-based place in the tenant's holding queue, for a HOLDING job."""
    holding: int
    """The tenant's HOLDING batch jobs."""
    active_batches: int
    """The tenant's batch jobs in an active slot."""
    ready_ahead: int
    """QUEUED jobs of the same tenant that run before this one (QUEUED jobs only)."""
    tenants_ahead: int
    """Other tenants with QUEUED jobs (QUEUED jobs only)."""
    pauses: tuple[Pause, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class JobFilter:
    """What :meth:`Store.jobs` and :meth:`Store.counts` select."""

    tenant: str | None = None
    state: State | None = None
    kind: Kind | None = None
    task: str | None = None
    created_after: float | None = None
    created_before: float | None = None


class Store(Protocol):
    """Durable storage of jobs: every method is atomic (one transaction).

    Times are epoch seconds passed in by the caller, so that the store never reads a clock.
    """

    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    async def close(self) -> None:
        """Release connections; the store may be opened again."""

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        """Insert every unit in one transaction, each unit all-or-nothing."""

    async def ready_tenants(self, tasks: Collection[str]) -> list[str]:
        """Tenants that have QUEUED jobs of ``tasks`` (suspects aside)."""

    async def claim(
        self,
        owner: str,
        wanted: Mapping[str, int],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        """Move up to ``wanted[tenant]`` QUEUED jobs of each tenant to PROCESSING.

        Only jobs of ``tasks`` (those the claiming process can run) are taken, by priority, kind
        and age, skipping paused tasks and tenants (or all, if the queue is paused) and
        suspects (see :meth:`recover`).
        """

    async def report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[JobId]:
        """Write outcomes of jobs ``owner`` holds; return the ids written.

        An outcome for a job whose lease ``owner`` no longer holds is dropped. A released job
        whose abort was requested ends ABORTED rather than QUEUED.
        """

    async def renew(self, owner: str, job_ids: Collection[JobId], lease_until: float) -> Renewal:
        """Extend the leases ``owner`` holds on ``job_ids``; return those of them whose abort
        was requested, and those that ``owner`` no longer holds.

        Only the jobs named are renewed: a job that ``owner`` holds in the store without
        knowing it (a claim that committed, and whose answer the connection lost) lets its
        lease run out and is recovered, rather than being held by nobody for ever. A job that
        is merely locked by another transaction may be left unrenewed this time, but it is
        not lost unless its committed row is no longer running under ``owner``'s lease.
        """

    async def recover(self, now: float, max_lease_expiries: int) -> Recovered:
        """Requeue running jobs whose lease expired before ``now`` (an attempt counted).

        A job whose lease has expired ``max_lease_expiries`` times ends FAILED; one whose abort
        was requested ends ABORTED. A requeued job is a *suspect*: it may be what killed its
        worker, so :meth:`claim` leaves it to :meth:`claim_suspect`. The lost attempt stays
        counted, yet only ``max_lease_expiries`` decides whether a crashed job runs again, so
        ``attempts`` may exceed ``max_attempts`` after crashes.
        """

    async def has_suspects(self, tasks: Collection[str]) -> bool:
        """Whether :meth:`claim_suspect` would find a job of ``tasks`` now."""

    async def claim_suspect(
        self, owner: str, tasks: Collection[str], now: float, lease_until: float
    ) -> ClaimedJob | None:
        """Claim the oldest QUEUED suspect of ``tasks`` (of a tenant that is not paused).

        The caller runs it alone, so that if it kills its process again it takes no innocent
        job with it.
        """

    async def promote(self, now: float) -> tuple[list[str], float | None]:
        """Move SCHEDULED jobs whose time came to QUEUED.

        Returns the tenants that got ready work and the earliest ``run_at`` still waiting.
        """

    async def request_abort(self, job_id: JobId, now: float) -> State:
        """Abort a job: a waiting one ends ABORTED; a running one is flagged for its worker.

        Returns the state after the call. Raises JobNotFound, or IllegalTransition for a final
        job.
        """

    async def set_progress(self, owner: str, job_id: JobId, progress: str) -> bool:
        """Store a running job's progress (JSON); False if ``owner`` no longer holds it."""

    async def get(self, job_id: JobId) -> JobInfo:
        """One job, or raise JobNotFound."""

    async def get_many(self, job_ids: Sequence[JobId]) -> list[JobInfo]:
        """The jobs that exist among ``job_ids``, in no particular order."""

    async def jobs(
        self, where: JobFilter, *, after_seq: int | None, offset: int, limit: int
    ) -> list[tuple[int, JobInfo]]:
        """Jobs in creation order with their sequence numbers (for cursors)."""

    async def counts(self, where: JobFilter) -> dict[State, int]:
        """How many jobs are in each state (states with none are left out)."""

    async def set_pause(self, scope: PauseScope, name: str, paused: bool, now: float) -> bool:
        """Add or remove a pause; return whether anything changed."""

    async def pauses(self) -> list[Pause]:
        """Every pause in force."""

    async def prune(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` final jobs that finished before the time; return how many."""

    # -- batch jobs, the holding queue and active slots ---------------------------------------
    #
    # A batch job (kind BATCH) is enqueued HOLDING, at the end of its tenant's holding queue,
    # unless that queue holds ``max_holding`` jobs already (the unit then fails with
    # LimitExceeded). Whenever a tenant has fewer than ``max_active_batches`` batch jobs in
    # QUEUED, SCHEDULED (a retry of ``start``), PREPARING or PROCESSING, its first HOLDING job
    # moves to QUEUED in the same transaction: at enqueue, when a batch job ends, and in
    # :meth:`admit`. Claiming a batch job moves it to PREPARING.

    def set_limits(self, limits: LimitTable) -> None:
        """Use these limits from now on (the default: :class:`flexq.Limits` for all)."""

    async def admit(self, now: float) -> list[str]:
        """Admit HOLDING jobs into free active slots; return the tenants that got some."""

    async def holding_order(self, tenant: str) -> list[JobId]:
        """The tenant's HOLDING jobs, first to be admitted first."""

    async def reorder(self, job_id: JobId, placement: Placement) -> bool:
        """Move a HOLDING job within its tenant's holding queue; return whether it moved.

        Raises JobNotFound, NotHolding (the job, or ``placement.other``, is not HOLDING), or
        InvalidArguments (``placement.other`` is another tenant's job, or the job itself).
        """

    async def usage(self, tenant: str) -> tuple[int, int]:
        """The tenant's HOLDING jobs and batch jobs in an active slot."""

    async def wait_facts(self, job_id: JobId) -> WaitFacts:
        """What keeps a job waiting. Raises JobNotFound."""

    async def begin_batch(self, owner: str, job_id: JobId) -> BatchCounts | None:
        """Start an attempt of a batch job that ``owner`` holds (PREPARING).

        If ``start`` committed its items, the job moves to PROCESSING; if not, chunks an
        earlier attempt left behind are deleted. None if ``owner`` does not hold the job.
        """

    async def add_chunks(
        self, owner: str, job_id: JobId, first: int, chunks: Sequence[tuple[int, str]]
    ) -> bool:
        """Store chunks ``first``, ``first + 1``... as (item count, JSON list of items)."""

    async def end_preparing(
        self, owner: str, job_id: JobId, total_items: int, chunks_total: int
    ) -> bool:
        """Mark ``start`` as committed and move the job to PROCESSING."""

    async def pending_chunks(self, job_id: JobId, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` chunks after index ``after`` with no checkpoint: (index, items)."""

    async def checkpoint(self, owner: str, job_id: JobId, done: Sequence[ChunkDone]) -> bool:
        """Record finished chunks and add them to the job's counts; False if not held."""

    async def batch_summary(self, job_id: JobId) -> tuple[BatchCounts, list[tuple[int, str]]]:
        """The job's counts and (chunk index, JSON error) of each failed chunk.

        Raises JobNotFound if there is no batch job with this id.
        """

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRecord, now: float) -> ScheduleRecord:
        """Insert a schedule, or update the one with its name; return it as stored.

        An update takes the new tenant, task, arguments, expression, zone, misfire policy and
        reserve flag, and keeps the state and history (previous fire time, times triggered,
        last job). It keeps ``next_fire_time`` too unless the expression or the zone changed.
        Every change bumps ``revision``.
        """

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        """The schedule with this name, if any."""

    async def list_schedules(self, tenant: str | None) -> list[ScheduleRecord]:
        """Every schedule (of ``tenant``, if given), by name."""

    async def due_schedules(
        self, tasks: Collection[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        """Active schedules of ``tasks`` whose ``next_fire_time`` is at or before ``now``, and
        the earliest ``next_fire_time`` after ``now`` of the other active ones."""

    async def fire_schedule(
        self,
        name: str,
        revision: int,
        firing: ScheduleFiring,
        jobs: Sequence[NewJob],
        now: float,
    ) -> bool:
        """Advance an active schedule and insert its jobs, in one transaction.

        Does nothing and returns False unless the schedule is active and still at
        ``revision`` (another process fired or changed it first).
        """

    async def set_schedule_state(
        self, name: str, revision: int, state: str, next_fire_time: float | None
    ) -> ScheduleRecord | None:
        """Pause or resume a schedule that is still at ``revision``; None if it is not."""

    async def delete_schedule(self, name: str) -> bool:
        """Remove a schedule; return whether it existed. Its jobs stay."""

    # -- dependencies and chains -------------------------------------------------------------

    async def enqueue_dependent(self, jobs: Sequence[DependentJob], now: float) -> list[JobId]:
        """Insert jobs that wait for parents, all in one transaction, or none.

        A parent is an existing job or one earlier in ``jobs``. A job whose parents have all
        COMPLETED enters QUEUED (or SCHEDULED); one with a parent not final enters WAITING; one
        with a FAILED or ABORTED parent ends ABORTED at once, unless its ``on_parent_failure``
        is ``"run"``. Raises JobNotFound (naming the parent) for an unknown parent.

        Whenever a job reaches a final state, the same transaction releases its dependants:
        a dependant whose last unfinished parent COMPLETED becomes QUEUED (or SCHEDULED), and
        one whose parent ended FAILED or ABORTED ends ABORTED with an error naming that parent
        (and so on down its own dependants), unless its ``on_parent_failure`` is ``"run"``.
        """

    async def waiting_for(self, job_id: JobId) -> list[JobId]:
        """The parents a WAITING job still waits for."""

    async def claim_jobs(
        self,
        owner: str,
        job_ids: Collection[JobId],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        """Move these jobs to PROCESSING, those that are QUEUED (suspects aside) and of
        ``tasks``, unless paused: what :meth:`claim` takes, by id instead of by turn."""

    async def chain(self, job_id: JobId) -> list[JobInfo]:
        """The job, its ancestors and its descendants by ``parent_id``, in creation order.

        Raises JobNotFound.
        """

    # -- worker processes ---------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        """Register a worker process, or record that it is still alive (its ``last_seen``)."""

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker process that stopped."""

    async def list_workers(self) -> list[WorkerRecord]:
        """Every registered worker process, by start time."""

    async def prune_workers(self, seen_before: float) -> int:
        """Forget workers not seen since ``seen_before`` (their process died); return how many."""

    async def listen(
        self,
        wake: Callable[[list[str] | None, float | None], None],
        free_workers: Callable[[], int],
    ) -> None:
        """Until cancelled, call ``wake(tenants, run_at)`` when another process made work ready.

        ``tenants`` have QUEUED jobs now, and ``run_at`` is the earliest time of a new
        SCHEDULED job; ``tenants`` None means "look at the store". ``free_workers`` says how
        many jobs this process could start now: while it listens, a store need not wake other
        processes for work this process takes on itself. A store that cannot hear other
        processes (memory, SQLite) just waits to be cancelled: the dispatcher's poll finds
        their work.
        """


ACTIVE_BATCH_STATES = frozenset({State.QUEUED, State.SCHEDULED, State.PREPARING, State.PROCESSING})
"""States in which a batch job holds one of its tenant's active slots."""

HOLDING_STEP = 1024.0
"""Gap between neighbours in a holding queue: moves halve gaps; a gap too small to halve
makes the store renumber the tenant's (short) holding queue in the same transaction."""


def holding_full(tenant: str, max_holding: int) -> LimitExceeded:
    """The error of an enqueue into a full holding queue."""
    return LimitExceeded(
        f"tenant {tenant!r} has {max_holding} batch jobs in its holding queue already"
        f" (max_holding={max_holding}); nothing was enqueued"
    )


@runtime_checkable
class EnqueuesInTransaction(Protocol):
    """A store that can write jobs in a transaction of the application's own connection."""

    async def enqueue_in(self, connection: object, unit: EnqueueUnit, now: float) -> EnqueueResult:
        """Insert the unit's jobs through ``connection``, in its current transaction.

        Raises InvalidArguments for a connection of a kind the store cannot use.
        """


class ClaimRequest(NamedTuple):
    """A claim to make in the transaction of an enqueue (:class:`ClaimsOnEnqueue`): the
    arguments of :meth:`Store.claim` but the time, which is the enqueue's."""

    owner: str
    wanted: Mapping[str, int]
    tasks: Collection[str]
    lease_until: float


@runtime_checkable
class ClaimsOnEnqueue(Protocol):
    """A store that can claim jobs in the same round trip as it enqueues."""

    async def enqueue_and_claim(
        self, units: Sequence[EnqueueUnit], now: float, claim: ClaimRequest
    ) -> tuple[list[EnqueueResult], list[ClaimedJob] | None]:
        """:meth:`Store.enqueue`, then :meth:`Store.claim` of ``claim`` once the jobs are in.

        The jobs are durable when it returns, claimed or not; if it raises, nothing was
        claimed. None instead of the claimed jobs: the store made no claim, and leaves it to
        the dispatcher.
        """


@runtime_checkable
class ClaimsInParallel(Protocol):
    """A store whose claims run side by side, each on a connection of its own."""

    @property
    def parallel_claims(self) -> int:
        """How many claims the dispatcher may have in flight at once (the others: one)."""


def checked_outcomes(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Validate outcomes before any is written; keep the first one of each job.

    Raises IllegalTransition for a move the table forbids, and InvalidArguments for a retry
    without its error or time.
    """
    first: dict[JobId, Outcome] = {}
    for outcome in outcomes:
        check_transition(State.PROCESSING, outcome.state, outcome.job_id)
        retry = outcome.state in (State.QUEUED, State.SCHEDULED) and not outcome.release
        if retry and (outcome.error is None or outcome.run_at is None):
            raise InvalidArguments(f"a retry of job {outcome.job_id!r} needs its error and run_at")
        first.setdefault(outcome.job_id, outcome)
    return list(first.values())


def error_record(
    type_name: str, message: str, traceback: str, attempt: int, at: float
) -> dict[str, object]:
    """The stored form of one attempt's error."""
    return {
        "type": type_name,
        "message": message,
        "traceback": traceback,
        "attempt": attempt,
        "at": at,
    }


def lease_error(attempt: int, expiries: int, max_expiries: int, now: float) -> dict[str, object]:
    """The error recorded when a running job's lease expires."""
    return error_record(
        "flexq.LeaseExpired",
        f"the worker running attempt {attempt} stopped renewing its lease (its process died or"
        f" lost the database); lease expiry {expiries} of at most {max_expiries}",
        "",
        attempt,
        now,
    )


def job_info(
    *,
    id: JobId,
    task: str,
    kind: str,
    tenant: str,
    priority: int,
    state: str,
    args: str,
    kwargs: str,
    attempts: int,
    max_attempts: int,
    created_at: float,
    run_at: float,
    started_at: float | None,
    finished_at: float | None,
    result: str | None,
    errors: str | None,
    parent_id: JobId | None,
    key: str | None,
    progress: str | None,
    abort_requested: bool,
    batch: BatchCounts | None = None,
    callouts: int = 0,
) -> JobInfo:
    """A JobInfo from the stored (serialized) columns of a job."""
    return JobInfo(
        id=id,
        task=task,
        kind=Kind(kind),
        tenant=tenant,
        priority=priority,
        state=State(state),
        args=tuple(loads(args)),
        kwargs=loads(kwargs),
        attempts=attempts,
        max_attempts=max_attempts,
        created_at=timestamp_to_datetime(created_at),
        run_at=timestamp_to_datetime(run_at),
        started_at=timestamp_to_datetime(started_at),
        finished_at=timestamp_to_datetime(finished_at),
        result=None if result is None else loads(result),
        errors=tuple(
            JobError(
                type=e["type"],
                message=e["message"],
                traceback=e["traceback"],
                attempt=e["attempt"],
                at=timestamp_to_datetime(e["at"]),
            )
            for e in (loads(errors) if errors else ())
        ),
        parent_id=parent_id,
        key=key,
        progress=(
            batch.progress() if batch is not None else None if progress is None else loads(progress)
        ),
        abort_requested=bool(abort_requested),
        callouts=callouts,
    )


class ScheduleRecord(NamedTuple):
    """A stored cron schedule, serialized."""

    name: str
    tenant: str
    cron: str
    timezone: str
    task: str
    args: str
    """JSON list."""
    kwargs: str
    """JSON object."""
    misfire: str
    reserve: bool
    """Whether its jobs run on a worker kept for them (``reserved_workers``)."""
    state: str
    """``"active"`` or ``"paused"``."""
    next_fire_time: float | None
    previous_fire_time: float | None = None
    times_triggered: int = 0
    last_job_id: JobId | None = None
    revision: int = 0
    """Bumped by every change, so that a firing can tell it read the latest version."""
    created_at: float = 0.0


class ScheduleFiring(NamedTuple):
    """How one firing advances a schedule (the job count comes from the jobs inserted)."""

    next_fire_time: float | None
    previous_fire_time: float | None
    """The latest fire time that got a job; None if the firing enqueued nothing."""
    last_job_id: JobId | None


OnParentFailure = Literal["abort", "run"]


class DependentJob(NamedTuple):
    """A job to insert that waits for other jobs (its parents) to complete."""

    job: NewJob
    parents: tuple[JobId, ...]
    on_parent_failure: OnParentFailure = "abort"


def parent_failed_error(parent_id: JobId, parent_state: State, now: float) -> dict[str, object]:
    """The error recorded on a job aborted because a job it depends on did not complete."""
    return error_record(
        "flexq.ParentFailed",
        f"job {parent_id!r}, which this job depends on, ended {parent_state}",
        "",
        0,
        now,
    )


class WorkerRecord(NamedTuple):
    """A worker process as the store keeps it (see :meth:`flexq.Queue.workers`)."""

    id: str
    host: str
    pid: int
    workers: int
    lease: float
    started_at: float
    last_seen: float


class Migration(NamedTuple):
    """One step of a store's schema: the version it makes, what it does, its SQL statements."""

    version: int
    description: str
    sql: str


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaStatus:
    """A store's schema against this flexq's, as found (and migrated) by ``flexq migrate``."""

    where: str
    """What holds the schema, for messages: ``schema 'flexq'``, or a SQLite file's path."""
    version: int
    """The version found; 0 when there was no schema."""
    latest: int
    """The version this flexq uses."""
    applied: tuple[tuple[int, str], ...] = ()
    """The migrations just applied (version and description), in order."""


@runtime_checkable
class VersionedStore(Protocol):
    """A store with a versioned schema: SQLite and PostgreSQL, not memory.

    Both methods work on a closed store too, on a connection of their own.
    """

    async def schema_status(self) -> SchemaStatus:
        """Where the schema stands; changes nothing."""

    async def migrate(self) -> SchemaStatus:
        """Create the schema or bring it up to this flexq's version (what it found and did).

        Raises:
            SchemaVersionError: the schema is newer than this flexq's; nothing was changed.
        """
