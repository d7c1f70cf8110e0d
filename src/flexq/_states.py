"""Job states, job kinds and the one table of legal transitions."""

from __future__ import annotations

import enum

from flexq._errors import IllegalTransition


class State(enum.StrEnum):
    """The state of a job. ``COMPLETED``, ``FAILED`` and ``ABORTED`` are final."""

    SCHEDULED = "SCHEDULED"
    """Waiting for its ``run_at`` time (a delayed job, or a retry after backoff)."""
    WAITING = "WAITING"
    """Waiting for the jobs it depends on (``depends_on``, a step of a chain) to complete."""
    HOLDING = "HOLDING"
    """A batch job waiting in the tenant's holding queue."""
    QUEUED = "QUEUED"
    """Ready to run: waiting only for a worker and its fair share."""
    PREPARING = "PREPARING"
    """A batch job whose ``start`` is running."""
    PROCESSING = "PROCESSING"
    """Claimed by a worker and running (a batch job: its chunks)."""
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"

    @property
    def is_final(self) -> bool:
        """Whether the job can never change state again."""
        return self in FINAL_STATES


class Kind(enum.StrEnum):
    """What sort of job it is; decides ordering at equal priority."""

    FUTURE = "future"
    """A fire-and-forget call: its return value is not kept; it runs before queueable jobs of
    equal priority."""
    QUEUEABLE = "queueable"
    """A job whose return value is kept as its result."""
    BATCH = "batch"
    SCHEDULED = "scheduled"

    @property
    def rank(self) -> int:
        """Order among kinds at equal priority: lower runs first (future before queueable)."""
        return _KIND_RANK[self]


_KIND_RANK = {Kind.FUTURE: 0, Kind.QUEUEABLE: 1, Kind.SCHEDULED: 1, Kind.BATCH: 2}

FINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.ABORTED})
RUNNING_STATES = frozenset({State.PREPARING, State.PROCESSING})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.SCHEDULED: frozenset({State.QUEUED, State.ABORTED}),
    State.WAITING: frozenset({State.QUEUED, State.SCHEDULED, State.HOLDING, State.ABORTED}),
    State.HOLDING: frozenset({State.QUEUED, State.ABORTED}),
    State.QUEUED: frozenset({State.PREPARING, State.PROCESSING, State.ABORTED}),
    State.PREPARING: frozenset(
        {State.PROCESSING, State.QUEUED, State.SCHEDULED, State.FAILED, State.ABORTED}
    ),
    State.PROCESSING: frozenset(
        {State.COMPLETED, State.FAILED, State.ABORTED, State.QUEUED, State.SCHEDULED}
    ),
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
    State.ABORTED: frozenset(),
}
"""Every legal move. A running job goes back to QUEUED (lease lost, shutdown) or SCHEDULED
(retry after a backoff); a WAITING job becomes QUEUED (or SCHEDULED, until its ``run_at``) when
its last parent completes, or ABORTED when a parent fails; nothing leaves a final state."""


def check_transition(source: State, target: State, job_id: str | None = None) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``source -> target``."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(job_id, source, target)
