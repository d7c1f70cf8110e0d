"""Helpers for testing your own tasks and batch jobs with flexq.

They play the part of the platform's test context: enqueue a number of batch jobs and read
where they wait in the holding queue, run a batch job to the end as one awaited call, and read
its summary afterwards. Use them with the ``memory://`` store, under asyncio or trio::

    import flexq
    from flexq.testing import run_batch

    queue = flexq.Queue("memory://", max_loop_lag=None)

    async def test_reindex() -> None:
        info = await run_batch(queue, Reindex, "2026-01-01", tenant="acme")
        assert info.state is flexq.State.COMPLETED
        assert info.progress == flexq.BatchProgress(1000, 1000, 0, 5, 5, 0)

Each helper works on a queue that is closed, open (``await queue.open()``), or running
(``async with queue:``); the ones that run jobs start the queue's workers for the call when
they are not running, and stop them (and close the queue, if it was closed) before returning.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import anyio

from flexq._batch import BatchSummary, read_summary
from flexq._errors import InvalidArguments, JobNotFound, WaitTimeout
from flexq._models import Call
from flexq._states import Kind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from flexq._models import JSON, JobId, JobInfo
    from flexq._queue import Queue

__all__ = [
    "batch_summary",
    "enqueue_batches",
    "flex_positions",
    "run_batch",
    "run_until_final",
]


async def enqueue_batches(
    queue: Queue,
    batch_class: type,
    n: int,
    *args: JSON,
    tenant: str | None = None,
    priority: int | None = None,
    kwargs: Mapping[str, JSON] | None = None,
) -> list[JobId]:
    """Enqueue ``n`` jobs of a batch class with the same arguments, in one transaction.

    The jobs wait HOLDING in the tenant's holding queue (those that fit in a free active slot
    are admitted to QUEUED at once, as with ``queue.enqueue``).

    Args:
        queue: the queue the class is registered with (opened for the call if it is closed).
        batch_class: a class decorated with ``@queue.batch``.
        n: how many jobs.
        args: positional arguments of ``start`` (after the context), for every job.
        tenant: whose jobs they are (default ``"default"``).
        priority: as for ``queue.enqueue``.
        kwargs: keyword arguments of ``start``, for every job.

    Returns:
        The job ids in the order they were enqueued: the order of the holding queue, unless
        some were admitted.

    Raises:
        LimitExceeded: the tenant's holding queue has no room for ``n`` more jobs (then none
            is written).
        InvalidArguments: ``batch_class`` is not a batch class of this queue, or ``n < 0``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidArguments(f"n must be an int >= 0, not {n!r}")
    _check_batch_class(queue, batch_class)
    calls = [Call(batch_class, *args, **(kwargs or {})) for _ in range(n)]
    async with _opened(queue):
        return await queue.enqueue_many(calls, tenant=tenant, priority=priority)


async def flex_positions(queue: Queue, job_ids: Sequence[JobId]) -> list[int | None]:
    """Where each job waits in its tenant's holding queue: 0 is next to be admitted.

    A job that is not HOLDING (admitted, running, final, or unknown) gets None. The jobs may
    belong to several tenants; each is placed in its own tenant's queue. Reads what
    ``queue.flex.order`` reads, shaped for an assertion::

        first, second, third = await enqueue_batches(queue, Reindex, 3)
        await queue.flex.move_to_front(third)
        assert await flex_positions(queue, [first, second, third]) == [1, 2, 0]
    """
    async with _opened(queue):
        infos = await queue.get_many(job_ids)
        tenants = {info.tenant for info in infos}
        places: dict[JobId, int] = {}
        for tenant in sorted(tenants):
            order = await queue.flex.order(tenant)
            places.update((job_id, index) for index, job_id in enumerate(order))
    return [places.get(job_id) for job_id in job_ids]


async def run_until_final(
    queue: Queue, job_ids: Sequence[JobId], *, timeout: float | None = 30.0
) -> list[JobInfo]:
    """Let the queue's workers run until every one of the jobs is final; return them.

    Starts the workers for the call if they are not running. The jobs go through the queue as
    they would in production: batch jobs wait for an active slot of their tenant, paused jobs
    stay paused.

    Args:
        queue: the queue the jobs are in.
        job_ids: the jobs to wait for.
        timeout: seconds to wait for all of them (None: no limit).

    Returns:
        The jobs' final :class:`flexq.JobInfo`, in the order of ``job_ids``. A job that ended
        FAILED or ABORTED is returned, not raised: assert on its state.

    Raises:
        WaitTimeout: a job was not final in time; the message says why, from
            ``queue.explain``.
        JobNotFound: no job has one of the ids.
    """
    limit = math.inf if timeout is None else timeout
    async with _workers(queue):
        infos: list[JobInfo] = []
        with anyio.move_on_after(limit) as scope:
            for job_id in job_ids:
                infos.append(await queue.wait(job_id))  # noqa: PERF401 (kept if cancelled)
        if scope.cancelled_caught:
            stuck = job_ids[len(infos)]
            explanation = await queue.explain(stuck)
            raise WaitTimeout(f"not final after {timeout} s: {explanation}")
    return infos


async def run_batch(
    queue: Queue,
    batch_class: type,
    *args: JSON,
    tenant: str | None = None,
    priority: int | None = None,
    kwargs: Mapping[str, JSON] | None = None,
    timeout: float | None = 30.0,
) -> JobInfo:
    """Enqueue one job of a batch class and run it to the end: ``start``, every chunk,
    ``finish``.

    The job takes the normal path (HOLDING, admitted to one of the tenant's active slots,
    PREPARING, PROCESSING): if the tenant's slots are taken by jobs that do not end, it waits
    and the call times out with the reason.

    Args:
        queue: the queue the class is registered with; its workers run for the call if they
            are not running.
        batch_class: a class decorated with ``@queue.batch``.
        args: positional arguments of ``start`` (after the context).
        tenant: whose job it is (default ``"default"``).
        priority: as for ``queue.enqueue``.
        kwargs: keyword arguments of ``start``.
        timeout: seconds the whole batch may take (None: no limit).

    Returns:
        The final :class:`flexq.JobInfo`: ``result`` is what ``finish`` returned,
        ``progress`` the :class:`flexq.BatchProgress`. Read the failed chunks' errors with
        :func:`batch_summary`.

    Raises:
        WaitTimeout: the job was not final in time; the message says why.
        InvalidArguments: ``batch_class`` is not a batch class of this queue, or the
            arguments do not fit its ``start``.
    """
    _check_batch_class(queue, batch_class)
    async with _workers(queue):
        job_id = await queue.enqueue(
            batch_class, *args, tenant=tenant, priority=priority, kwargs=kwargs
        )
        (info,) = await run_until_final(queue, [job_id], timeout=timeout)
    return info


async def batch_summary(queue: Queue, job_id: JobId) -> BatchSummary:
    """A batch job's :class:`flexq.BatchSummary` as it is now: its counts and the error of
    each failed chunk (what ``finish`` received, once the job is final).

    A job that has not started yet has an empty summary.

    Raises:
        JobNotFound: no job has this id.
        InvalidArguments: the job is not a batch job.
    """
    async with _opened(queue):
        info = await queue.get(job_id)
        if info.kind is not Kind.BATCH:
            raise InvalidArguments(f"job {job_id!r} is a {info.kind} job, not a batch job")
        try:
            return await read_summary(queue.store, job_id)
        except JobNotFound:  # a store keeps no counts before the job starts
            return BatchSummary(job_id, 0, 0, 0, 0, 0, ())


def _check_batch_class(queue: Queue, batch_class: type) -> None:
    task = getattr(batch_class, "__flexq_task__", None)
    if task is None or task.batch is None or queue.tasks.get(task.name) is not task:
        raise InvalidArguments(f"{batch_class!r} is not a batch class registered with {queue!r}")


@contextlib.asynccontextmanager
async def _opened(queue: Queue) -> AsyncIterator[None]:
    """The queue open for the block: as it is, or opened and closed again."""
    if queue._open:
        yield
        return
    await queue.open()
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await queue.close()


@contextlib.asynccontextmanager
async def _workers(queue: Queue) -> AsyncIterator[None]:
    """The queue's workers running for the block, and the queue as it was afterwards."""
    if queue._group is not None:
        yield
        return
    if not queue._open:
        async with queue:
            yield
        return
    await queue._start_workers()
    try:
        yield
    finally:
        await queue._stop_workers()
