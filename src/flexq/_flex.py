"""The holding (flex) queue: the order in which a tenant's batch jobs wait for a slot."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexq._errors import InvalidArguments
from flexq._store.base import Placement

if TYPE_CHECKING:
    from flexq._models import JobId
    from flexq._queue import Queue


class FlexQueue:
    """Reads and reorders the holding queues: ``queue.flex``.

    Each tenant's HOLDING batch jobs wait in an order of their own (FIFO unless reordered);
    when one of the tenant's active slots frees, its first job is admitted. Every move is one
    transaction and returns whether the order changed. A move raises
    :class:`flexq.JobNotFound` for an unknown id, :class:`flexq.NotHolding` for a job that is
    not HOLDING, and :class:`flexq.InvalidArguments` for a job of another tenant's queue.
    """

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    async def order(self, tenant: str) -> list[JobId]:
        """The tenant's holding queue, first to be admitted first."""
        self._queue._check_open()
        return await self._queue.store.holding_order(tenant)

    async def move_to_front(self, job_id: JobId) -> bool:
        """Make the job the next to be admitted."""
        return await self._move(job_id, Placement("front"))

    async def move_to_end(self, job_id: JobId) -> bool:
        """Make the job the last to be admitted."""
        return await self._move(job_id, Placement("end"))

    async def move_before(self, job_id: JobId, other_id: JobId) -> bool:
        """Put the job just before ``other_id`` (a HOLDING job of the same tenant)."""
        return await self._move(job_id, Placement("before", other=other_id))

    async def move_after(self, job_id: JobId, other_id: JobId) -> bool:
        """Put the job just after ``other_id`` (a HOLDING job of the same tenant)."""
        return await self._move(job_id, Placement("after", other=other_id))

    async def move_to(self, job_id: JobId, position: int) -> bool:
        """Put the job at 0-based ``position`` of its queue (past the end: last), as
        ``list.insert`` would after taking it out."""
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidArguments(f"position must be an int >= 0, not {position!r}")
        return await self._move(job_id, Placement("index", place=position))

    async def _move(self, job_id: JobId, placement: Placement) -> bool:
        self._queue._check_open()
        return await self._queue.store.reorder(job_id, placement)
