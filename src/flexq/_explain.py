"""Why a job is not running, in words a support person can read."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

from flexq._models import PauseScope
from flexq._states import State

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flexq._limits import Limits
    from flexq._models import JobId
    from flexq._store.base import WaitFacts


class Why(enum.StrEnum):
    """The kinds of reason :meth:`flexq.Queue.explain` gives."""

    FINISHED = "finished"
    """The job is final: it waits for nothing."""
    RUNNING = "running"
    """A worker runs it now."""
    NOT_DUE = "not_due"
    """Its ``run_at`` time (a delay, or a retry's backoff) has not come."""
    HOLDING = "holding"
    """It waits in its tenant's holding queue, at some position."""
    SLOTS_FULL = "slots_full"
    """Its tenant's active batch slots are all in use."""
    QUEUE_PAUSED = "queue_paused"
    TENANT_PAUSED = "tenant_paused"
    TASK_PAUSED = "task_paused"
    THROTTLED = "throttled"
    """This process's dispatcher claims nothing while the host is busy."""
    FAIR_SHARE = "fair_share"
    """It waits for its turn: ready jobs of its tenant come first, or other tenants' share."""
    WORKERS_BUSY = "workers_busy"
    """Every worker of this process is busy."""
    NOT_RUN_HERE = "not_run_here"
    """This process has no handler for its task (another process may run it)."""
    SUSPECT = "suspect"
    """Its last worker died while running it: it will run alone."""
    ABORTING = "aborting"
    """An abort was requested; its worker is stopping it."""
    WAITING_FOR_PARENTS = "waiting_for_parents"
    """It depends on jobs that have not completed yet (``depends_on``, a chain's step)."""
    NEXT = "next"
    """Nothing holds it back: a worker takes it at once."""


@dataclasses.dataclass(frozen=True, slots=True)
class WaitReason:
    """One reason a job waits."""

    why: Why
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Explanation:
    """Why a job is (not) running: the answer of :meth:`flexq.Queue.explain`."""

    job_id: JobId
    state: State
    tenant: str
    reasons: tuple[WaitReason, ...]
    """Every reason that holds now, the most decisive first."""
    holding_position: int | None
    """1-based place in the tenant's holding queue (HOLDING jobs)."""
    active_batches: int
    """The tenant's batch jobs in an active slot now."""
    max_active_batches: int
    ready_ahead: int
    """QUEUED jobs of the same tenant that run before it (QUEUED jobs)."""

    @property
    def whys(self) -> tuple[Why, ...]:
        """The kinds of the reasons, in order."""
        return tuple(reason.why for reason in self.reasons)

    def __str__(self) -> str:
        return f"job {self.job_id} ({self.state}): " + "; ".join(r.message for r in self.reasons)


@dataclasses.dataclass(frozen=True, slots=True)
class LocalFacts:
    """What this process knows that the store does not."""

    now: float
    limits: Limits
    runs_task: bool
    """Whether this process has a handler for the job's task."""
    has_workers: bool
    """Whether this process runs workers (``async with queue:``), not only enqueues."""
    workers: int
    busy_workers: int
    throttled: bool
    loop_lag: float


def explain(facts: WaitFacts, local: LocalFacts, parents: Sequence[JobId] = ()) -> Explanation:
    """Put the store's and this process's facts about a job into reasons (``parents``: the
    jobs a WAITING job still waits for)."""
    info = facts.info
    reasons: list[WaitReason] = []

    def add(why: Why, message: str) -> None:
        reasons.append(WaitReason(why, message))

    tenant = info.tenant
    slots = f"{facts.active_batches} of its {local.limits.max_active_batches} active batch slots"
    if info.is_final:
        add(Why.FINISHED, f"it is {info.state}: it waits for nothing")
    elif info.state in (State.PREPARING, State.PROCESSING):
        if info.abort_requested:
            add(Why.ABORTING, "an abort was requested; its worker is stopping it")
        else:
            add(Why.RUNNING, f"it is running ({info.state})")
    elif info.state is State.HOLDING:
        position = (facts.holding_position or 0) + 1
        add(Why.HOLDING, f"it is number {position} of {facts.holding} in the holding queue of"
                         f" tenant {tenant!r}")  # fmt: skip
        if facts.active_batches >= local.limits.max_active_batches:
            add(Why.SLOTS_FULL, f"tenant {tenant!r} uses {slots}; it is admitted when one frees")
        else:
            add(Why.HOLDING, "a slot is free: it is admitted within a poll interval")
    elif info.state is State.WAITING:
        names = ", ".join(repr(parent) for parent in parents[:5])
        more = f" and {len(parents) - 5} more" if len(parents) > 5 else ""
        add(Why.WAITING_FOR_PARENTS, f"it waits for {len(parents)} job(s) it depends on to"
                                     f" complete: {names}{more}")  # fmt: skip
    elif info.state is State.SCHEDULED:
        wait = info.run_at.timestamp() - local.now
        add(Why.NOT_DUE, f"it may not run before {info.run_at.isoformat()} (in {wait:.1f} s)")
    if info.state in (State.QUEUED, State.SCHEDULED, State.HOLDING):
        _add_pauses(facts, add)
    if info.state is State.QUEUED:
        _add_queued(facts, local, add)
        if not reasons:  # a pause, throttling or a missing handler holds it back too
            add(Why.NEXT, "nothing holds it back: a worker takes it at once")
    return Explanation(
        job_id=info.id,
        state=info.state,
        tenant=tenant,
        reasons=tuple(reasons),
        holding_position=None if facts.holding_position is None else facts.holding_position + 1,
        active_batches=facts.active_batches,
        max_active_batches=local.limits.max_active_batches,
        ready_ahead=facts.ready_ahead,
    )


def _add_pauses(facts: WaitFacts, add: _Add) -> None:
    info = facts.info
    for pause in facts.pauses:
        since = pause.since.isoformat()
        if pause.scope is PauseScope.QUEUE:
            add(Why.QUEUE_PAUSED, f"the whole queue is paused (since {since})")
        elif pause.scope is PauseScope.TENANT and pause.name == info.tenant:
            add(Why.TENANT_PAUSED, f"tenant {info.tenant!r} is paused (since {since})")
        elif pause.scope is PauseScope.TASK and pause.name == info.task:
            add(Why.TASK_PAUSED, f"task {info.task!r} is paused (since {since})")


def _add_queued(facts: WaitFacts, local: LocalFacts, add: _Add) -> None:
    info = facts.info
    if any(e.type == "flexq.LeaseExpired" for e in info.errors[-1:]):
        add(Why.SUSPECT, "its last worker died while running it: it runs alone, once the"
                         " running jobs are done")  # fmt: skip
    if not local.has_workers:
        add(Why.NOT_RUN_HERE, "this process runs no workers (it only enqueues and queries); a"
                              f" worker process with task {info.task!r} will run it")  # fmt: skip
    elif not local.runs_task:
        add(Why.NOT_RUN_HERE, f"this process has no handler for task {info.task!r}; a process"
                              " that registered it will run it")  # fmt: skip
    if local.throttled:
        add(Why.THROTTLED, f"this process claims no work while the host is busy (event loop"
                           f" lag {local.loop_lag * 1000:.0f} ms)")  # fmt: skip
    if local.busy_workers >= local.workers:
        add(Why.WORKERS_BUSY, f"all {local.workers} workers of this process are busy")
    if facts.ready_ahead or facts.tenants_ahead:
        add(Why.FAIR_SHARE, f"{facts.ready_ahead} ready jobs of tenant {info.tenant!r} run"
                            f" before it, and {facts.tenants_ahead} other tenants with ready"
                            " jobs share the workers fairly")  # fmt: skip


if TYPE_CHECKING:
    from collections.abc import Callable

    _Add = Callable[[Why, str], None]
