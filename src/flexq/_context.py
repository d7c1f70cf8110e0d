"""The context a handler receives when it asks for it by annotation."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import structlog

from flexq._callouts import CalloutTally
from flexq._errors import JobNotFound, LimitExceeded
from flexq._serialize import dumps

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    import httpx

    from flexq._models import JSON, JobId
    from flexq._queue import Queue
    from flexq._states import Kind
    from flexq._store.base import ClaimedJob, OnDuplicate, OnParentFailure
    from flexq._task import TaskRef


class Context:
    """What a running job knows about itself and may do.

    A handler gets one by declaring a parameter annotated ``flexq.Context``::

        @queue.task
        async def reindex(ctx: flexq.Context, shard: int) -> None:
            ctx.log.info("reindexing", shard=shard)
            await ctx.enqueue(notify, shard)       # a child job, linked by parent_id
    """

    def __init__(self, queue: Queue, job: ClaimedJob, owner: str) -> None:
        self._queue = queue
        self._job = job
        self._owner = owner
        self.children_enqueued = 0
        """How many jobs this attempt enqueued through :meth:`enqueue`."""
        self.callout_tally = CalloutTally(job, queue.limits_of(job.tenant).max_callouts_per_run)

    @property
    def job_id(self) -> JobId:
        """The running job's id."""
        return self._job.id

    @property
    def tenant(self) -> str:
        """The tenant the job runs for."""
        return self._job.tenant

    @property
    def task(self) -> str:
        """The task's registered name."""
        return self._job.task

    @property
    def kind(self) -> Kind:
        """The job's kind."""
        return self._job.kind

    @property
    def attempt(self) -> int:
        """This attempt's number, starting at 1."""
        return self._job.attempt

    @property
    def max_attempts(self) -> int:
        """How many attempts the job may have in all."""
        return self._job.max_attempts

    @property
    def parent_id(self) -> JobId | None:
        """The job that enqueued this one through its context, if any."""
        return self._job.parent_id

    @property
    def http(self) -> httpx.AsyncClient:
        """The queue's shared ``httpx.AsyncClient``, for callouts to other services.

        Its connections are pooled between all jobs. Each request is logged (method, host,
        status, duration) and counted on the job (``JobInfo.callouts``). A request that times
        out (``Queue(callout_timeout=...)``, or a ``timeout=`` of its own) or cannot be sent,
        and a 5xx response, raise :class:`flexq.CalloutFailed`; a 4xx response is returned for
        the handler to judge. The task's ``timeout`` cancels a request that outlives it. Mark
        tasks that mostly call out with ``@queue.task(callout=True)``.

        Raises:
            LimitExceeded: (on a request) this run made ``max_callouts_per_run`` requests
                already (see :class:`flexq.Limits`).
        """
        return self._queue._http_client()

    @property
    def callouts(self) -> int:
        """How many requests this attempt made through :attr:`http`."""
        return self.callout_tally.count

    @functools.cached_property
    def log(self) -> Any:
        """A structlog logger bound with job_id, tenant, task and attempt."""
        return structlog.get_logger("flexq").bind(
            job_id=self.job_id, tenant=self.tenant, task=self.task, attempt=self.attempt
        )

    async def enqueue(
        self,
        task: TaskRef,
        *args: JSON,
        tenant: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        key: str | None = None,
        on_duplicate: OnDuplicate = "raise",
        kwargs: dict[str, JSON] | None = None,
        depends_on: Sequence[JobId] | None = None,
        on_parent_failure: OnParentFailure = "abort",
    ) -> JobId:
        """Enqueue a child job (this job's tenant unless told otherwise); see Queue.enqueue.

        With ``depends_on`` the child also waits for those jobs (a fan-in of jobs this one
        fanned out, say); its ``parent_id`` is still this job.

        Raises:
            LimitExceeded: this run enqueued ``max_children_per_run`` jobs already (see
                :class:`flexq.Limits`).
        """
        limit = self._queue.limits_of(self.tenant).max_children_per_run
        if self.children_enqueued >= limit:
            raise LimitExceeded(
                f"a run of {self.task!r} may enqueue at most {limit} jobs"
                f" (max_children_per_run of tenant {self.tenant!r})"
            )
        self.children_enqueued += 1  # before the await: concurrent calls count too
        try:
            if depends_on is not None:
                return await self._queue._enqueue_dependent_one(
                    task, args, kwargs,
                    tenant=self.tenant if tenant is None else tenant, priority=priority,
                    delay=delay, run_at=run_at, key=key, parent_id=self.job_id,
                    depends_on=depends_on, on_parent_failure=on_parent_failure,
                )  # fmt: skip
            return await self._queue._enqueue_one(
                task,
                args,
                kwargs,
                tenant=self.tenant if tenant is None else tenant,
                priority=priority,
                delay=delay,
                run_at=run_at,
                key=key,
                on_duplicate=on_duplicate,
                parent_id=self.job_id,
            )
        except BaseException:
            self.children_enqueued -= 1
            raise

    async def previous_result(self) -> JSON:
        """The result of the job's parent: in a chain (:meth:`Queue.enqueue_chain`), the
        step before this one. None if the job has no parent, or the parent kept no result
        (a future, a handler that returned None, or a parent pruned after retention)."""
        if self.parent_id is None:
            return None
        try:
            parent = await self._queue._store.get(self.parent_id)
        except JobNotFound:
            return None
        return parent.result

    async def set_progress(self, progress: JSON) -> None:
        """Record how far the job got (any JSON value); visible as ``JobInfo.progress``."""
        await self._queue._store.set_progress(self._owner, self.job_id, dumps(progress, "progress"))
