"""Frozen value objects that queries return and calls take."""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias, overload

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flexq._states import Kind, State
    from flexq._task import TaskRef

JobId: TypeAlias = str
"""A job's id: an opaque string, unique in its store."""

JSON: TypeAlias = Any
"""A value that survives ``json.dumps``/``json.loads``: None, bool, int, float, str, list, dict."""


@overload
def timestamp_to_datetime(value: float) -> datetime: ...
@overload
def timestamp_to_datetime(value: float | None) -> datetime | None: ...
def timestamp_to_datetime(value: float | None) -> datetime | None:
    """A stored epoch timestamp as an aware UTC datetime."""
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class JobError:
    """What went wrong in one attempt of a job."""

    type: str
    """Qualified name of the exception class, e.g. ``builtins.ValueError``."""
    message: str
    traceback: str
    attempt: int
    at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class BatchProgress:
    """How far a batch job got: its ``JobInfo.progress``."""

    items_processed: int
    """Items of the chunks that ended (succeeded, or failed every try)."""
    total_items: int
    """Items that ``start`` produced (0 until it finished)."""
    errors: int
    """Chunks that failed every try."""
    chunks_total: int
    chunks_succeeded: int
    chunks_failed: int


@dataclasses.dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of one job, as the store holds it."""

    id: JobId
    task: str
    kind: Kind
    tenant: str
    priority: int
    state: State
    args: tuple[JSON, ...]
    kwargs: Mapping[str, JSON]
    attempts: int
    """Attempts started so far (the running one included)."""
    max_attempts: int
    created_at: datetime
    run_at: datetime
    """When the job may run: in the future while the job is SCHEDULED."""
    started_at: datetime | None
    """When the last attempt started."""
    finished_at: datetime | None
    result: JSON
    """The handler's return value (queueable jobs), else None."""
    errors: tuple[JobError, ...]
    """The error of every failed attempt, oldest first."""
    parent_id: JobId | None
    key: str | None
    progress: JSON
    """The last value the handler passed to ``ctx.set_progress``; for a batch job, its
    :class:`BatchProgress`."""
    abort_requested: bool
    callouts: int = 0
    """HTTP requests its attempts made through ``ctx.http``, counted as each attempt ends."""

    @property
    def error(self) -> JobError | None:
        """The error of the last failed attempt, if any."""
        return self.errors[-1] if self.errors else None

    @property
    def is_final(self) -> bool:
        """Whether the job reached COMPLETED, FAILED or ABORTED."""
        return self.state.is_final


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of a job query, ordered by creation."""

    items: tuple[JobInfo, ...]
    next_cursor: str | None
    """Pass as ``cursor=`` to get the next page; None on the last page."""


class PauseScope(enum.StrEnum):
    """What a pause covers."""

    QUEUE = "queue"
    TENANT = "tenant"
    TASK = "task"


@dataclasses.dataclass(frozen=True, slots=True)
class Pause:
    """A persisted pause: no new work of this scope is claimed until it is resumed."""

    scope: PauseScope
    name: str
    """The tenant or task name; empty for the whole queue."""
    since: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A snapshot of this process's dispatcher and workers."""

    workers: int
    running: int
    """Jobs this process holds (claimed and not yet reported)."""
    claimed: int
    completed: int
    failed: int
    retried: int
    aborted: int
    loop_lag: float
    """The event loop's last measured lag, in seconds."""
    throttled: bool
    """Whether claiming is paused now because the host is busy."""
    throttle_events: int
    """How many times claiming was paused for host load since the queue opened."""
    callouts_running: int = 0
    """Jobs of callout tasks this process holds (counted in ``running`` too)."""


class Call:
    """A call to enqueue: a task with its arguments, and optional per-call options.

    ``Call(send_invoice, 42, copy=True)`` passes ``42`` and ``copy=True`` to the handler.
    Options that :meth:`flexq.Queue.enqueue` takes (tenant, priority, delay, run_at, key)
    are given with :meth:`with_options`.
    """

    __slots__ = ("args", "kwargs", "options", "task")

    def __init__(self, task: TaskRef, /, *args: JSON, **kwargs: JSON) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.options: Mapping[str, Any] = {}

    def with_options(
        self,
        *,
        tenant: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        key: str | None = None,
    ) -> Call:
        """A copy of this call with enqueue options set for it alone."""
        given = {"tenant": tenant, "priority": priority, "delay": delay, "run_at": run_at}
        given["key"] = key
        clone = Call(self.task, *self.args, **self.kwargs)
        clone.options = {**self.options, **{k: v for k, v in given.items() if v is not None}}
        return clone

    def __repr__(self) -> str:
        name = self.task if isinstance(self.task, str) else getattr(self.task, "name", self.task)
        return f"Call({name!r}, args={self.args!r}, kwargs={self.kwargs!r})"


class ScheduleState(enum.StrEnum):
    """Whether a schedule fires."""

    ACTIVE = "active"
    PAUSED = "paused"


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A snapshot of one cron schedule (the platform's CronTrigger and CronJobDetail)."""

    name: str
    tenant: str
    cron: str
    timezone: str
    task: str
    args: tuple[JSON, ...]
    kwargs: Mapping[str, JSON]
    state: ScheduleState
    misfire: str
    """``"skip"``, ``"run_once"`` or ``"run_all"``: what happens to fire times missed while no
    process ran the schedule."""
    reserve: bool
    """Whether its jobs start on a worker kept free for them (``Queue(reserved_workers=...)``)."""
    previous_fire_time: datetime | None
    """The latest fire time that enqueued a job, in the schedule's time zone."""
    next_fire_time: datetime | None
    """When it fires next, in the schedule's time zone (None: the expression has no more)."""
    times_triggered: int
    """How many jobs it has enqueued."""
    last_job_id: JobId | None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker process sharing the store: one :class:`flexq.Queue` that runs workers."""

    id: str
    """``host:pid:random``: also the owner of the leases its jobs hold."""
    host: str
    pid: int
    workers: int
    """How many jobs it runs at once."""
    started_at: datetime
    last_seen: datetime
    """Its last heartbeat (every third of its lease while it runs)."""
    alive: bool
    """Whether it was seen within the last two of its leases."""
