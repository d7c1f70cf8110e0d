"""The store protocol and the records that cross it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from flexq._errors import DuplicateJob, InvalidArguments
from flexq._models import JobError, JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import loads
from flexq._states import Kind, State, check_transition

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

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


EnqueueResult = list[JobId] | DuplicateJob
"""Per unit: the ids (an existing job's id where a key matched and on_duplicate is "return"),
or the DuplicateJob that kept the unit from being written."""


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


@dataclasses.dataclass(frozen=True, slots=True)
class Recovered:
    """Jobs whose lease expired, by where they went."""

    requeued: list[JobId]
    failed: list[JobId]
    aborted: list[JobId]


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

    async def renew(self, owner: str, lease_until: float) -> list[JobId]:
        """Extend every lease ``owner`` holds; return the held jobs whose abort was requested."""

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


@runtime_checkable
class EnqueuesInTransaction(Protocol):
    """A store that can write jobs in a transaction of the application's own connection."""

    async def enqueue_in(self, connection: object, unit: EnqueueUnit, now: float) -> EnqueueResult:
        """Insert the unit's jobs through ``connection``, in its current transaction.

        Raises InvalidArguments for a connection of a kind the store cannot use.
        """


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
        progress=None if progress is None else loads(progress),
        abort_requested=bool(abort_requested),
    )
