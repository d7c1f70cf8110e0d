"""The Queue: the one object an application holds."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, overload

import anyio

from flexq._backoff import Backoff
from flexq._batch import make_batch_task
from flexq._batching import GroupCommit
from flexq._dispatcher import Dispatcher
from flexq._errors import (
    FlexqError,
    InvalidArguments,
    QueueClosed,
    ScheduleNotFound,
    UnknownTask,
    WaitTimeout,
)
from flexq._explain import Explanation, LocalFacts, explain
from flexq._fairness import DeficitRoundRobin
from flexq._flex import FlexQueue
from flexq._limits import Limits, LimitTable, LimitUsage
from flexq._models import (
    Call,
    JobInfo,
    Page,
    Pause,
    PauseScope,
    QueueStatistics,
    ScheduleInfo,
    ScheduleState,
    WorkerInfo,
    timestamp_to_datetime,
)
from flexq._runner import Runner
from flexq._schedules import DEFAULT_MISFIRE, Cron, Scheduler, check_misfire, schedule_info
from flexq._serialize import dumps
from flexq._states import Kind, State
from flexq._store.base import (
    ClaimsInParallel,
    ClaimsOnEnqueue,
    DependentJob,
    EnqueueResult,
    EnqueuesInTransaction,
    EnqueueUnit,
    JobFilter,
    NewJob,
    OnDuplicate,
    ScheduleRecord,
    Store,
    WorkerRecord,
)
from flexq._store.url import store_from_url
from flexq._task import Handler, Task, TaskNames, TaskRef, check_priority, make_task
from flexq._throttle import LoadMonitor
from flexq._upkeep import Upkeep

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    import httpx

    from flexq._models import JSON, JobId
    from flexq._schedules import Misfire
    from flexq._store.base import OnParentFailure, Outcome

R = TypeVar("R")
R2 = TypeVar("R2")
C = TypeVar("C", bound=type)

DEFAULT_TENANT = "default"


class _Options(NamedTuple):
    tenant: str
    priority: int | None
    run_at: float
    key: str | None
    delayed: bool


class _Waiter:
    """The callers of :meth:`Queue.wait` for one job, woken when this process finishes it."""

    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.count = 0


class _JobIds:
    """Job ids: 16 random hex digits drawn once per process, then a 16-digit counter."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> JobId:
        return f"{self._prefix}{next(self._counter):016x}"


new_job_id = _JobIds()
os.register_at_fork(after_in_child=new_job_id.reset)
MAX_PAGE = 1000
MAX_ARGUMENTS_BYTES = 1024 * 1024
"""The most a job's arguments may take, encoded as JSON (args and kwargs together)."""


class Queue:
    """A durable job queue that runs its jobs in this event loop.

    Args:
        url: ``"sqlite:///flexq.db"`` (the default), ``"memory://"``,
            ``"postgresql://user@host/database"``, or a Store object.
        workers: how many jobs run at once in this process.
        lease: seconds a claimed job is held before another process may take it over, unless
            renewed (this process renews every third of it while the job runs).
        poll_interval: how often to look for work enqueued by other processes, in seconds.
        grace_period: how long leaving ``async with`` waits for running jobs before it cancels
            them and returns them to the queue.
        retention: how long final jobs stay queryable before the pruner deletes them.
        prune_interval: seconds between pruning passes.
        max_loop_lag: claim no new jobs while the event loop lags more than this (seconds);
            None disables the check.
        load_probe: optional callable; while it returns True, claim no new jobs (e.g. a CPU or
            memory check of the host).
        backoff: the default wait between attempts of failed jobs.
        weights: fair-share weight per tenant (default 1.0; 2.0 gets twice the workers).
        max_lease_expiries: a job whose lease expired this many times (its process keeps dying)
            ends FAILED instead of being run again.
        limits: the :class:`Limits` of every tenant (holding queue size, active batch slots,
            children per run); every process sharing a store should use the same.
        tenant_limits: limits of particular tenants, overriding ``limits``.
        clock: the time source (epoch seconds) for timestamps; tests may replace it.
        reserved_workers: extra workers kept free for the jobs of schedules made with
            ``reserve=True``; no other job runs on them.
        callout_concurrency: how many jobs of callout tasks (``@queue.task(callout=True)``)
            run at once in this process, besides the ``workers``.
        callout_timeout: seconds a request through ``ctx.http`` may take (connecting,
            sending, waiting for data) before it fails with :class:`CalloutFailed`.
        schema: the PostgreSQL schema of flexq's tables (default ``"flexq"``, or the URL's
            ``?schema=``); only for ``postgresql://`` URLs.
        migrate: create or migrate the store's schema when the queue opens (the default). With
            False, opening raises :class:`SchemaVersionError` unless the schema is already at
            this flexq's version: for deployments that run ``flexq migrate`` in a release step.
    """

    def __init__(
        self,
        url: str | Store = "sqlite:///flexq.db",
        *,
        workers: int = 8,
        lease: float = 10.0,
        poll_interval: float = 0.25,
        grace_period: float = 10.0,
        retention: float | timedelta = timedelta(days=7),
        prune_interval: float = 60.0,
        max_loop_lag: float | None = 0.1,
        load_probe: Callable[[], bool] | None = None,
        backoff: Backoff | None = None,
        weights: Mapping[str, float] | None = None,
        max_lease_expiries: int = 3,
        limits: Limits | None = None,
        tenant_limits: Mapping[str, Limits] | None = None,
        clock: Callable[[], float] = time.time,
        reserved_workers: int = 1,
        callout_concurrency: int = 100,
        callout_timeout: float = 10.0,
        schema: str | None = None,
        migrate: bool = True,
    ) -> None:
        retention_seconds = (
            retention.total_seconds() if isinstance(retention, timedelta) else retention
        )
        _check_count("workers", workers, 1)
        _check_count("max_lease_expiries", max_lease_expiries, 1)
        _check_count("reserved_workers", reserved_workers, 0)
        _check_count("callout_concurrency", callout_concurrency, 1)
        for name, value in (
            ("lease", lease), ("poll_interval", poll_interval), ("retention", retention_seconds),
            ("prune_interval", prune_interval), ("callout_timeout", callout_timeout),
        ):  # fmt: skip
            _check_seconds(name, value, allow_zero=False)
        _check_seconds("grace_period", grace_period, allow_zero=True)
        if max_loop_lag is not None:
            _check_seconds("max_loop_lag", max_loop_lag, allow_zero=False)
        if schema is not None and not isinstance(url, str):
            raise InvalidArguments("schema= goes with a postgresql:// URL, not a Store object")
        if not migrate and not isinstance(url, str):
            raise InvalidArguments("migrate= goes with a URL, not a Store object")
        self._store: Store = (
            store_from_url(url, schema=schema, migrate=migrate) if isinstance(url, str) else url
        )
        self._claimer = self._store if isinstance(self._store, ClaimsOnEnqueue) else None
        """The store, if it claims as it enqueues (checked once: a protocol check is slow)."""
        self._limits = LimitTable(limits, tenant_limits)
        self._store.set_limits(self._limits)
        self.worker_count = workers
        self.lease = lease
        self.poll_interval = poll_interval
        self.grace_period = grace_period
        self.retention = retention_seconds
        self.prune_interval = prune_interval
        self.backoff = backoff or Backoff()
        self.max_lease_expiries = max_lease_expiries
        self.reserved_workers = reserved_workers
        self.callout_concurrency = callout_concurrency
        self.callout_timeout = callout_timeout
        self._weights = dict(weights or {})
        DeficitRoundRobin(self._weights)  # validates the weights now, not when the queue opens
        self._max_loop_lag = max_loop_lag
        self._load_probe = load_probe
        self._clock = clock
        self._tasks: dict[str, Task[Any]] = {}
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

        self._enqueuer: GroupCommit[EnqueueUnit, EnqueueResult] = GroupCommit(self._write_units)
        self._waiters: dict[JobId, _Waiter] = {}
        self._open = False
        self._group: anyio.abc.TaskGroup | None = None
        self._dispatcher: Dispatcher | None = None
        self._dispatcher_done: anyio.Event | None = None
        self._runner: Runner | None = None
        self._monitor: LoadMonitor | None = None
        self._upkeep: Upkeep | None = None
        self._scheduler: Scheduler | None = None
        self._http: httpx.AsyncClient | None = None
        self._dependants = False
        """Whether this process enqueued jobs that wait for others: then a job that ends may
        release some, and the dispatcher looks for them at once."""

    def __repr__(self) -> str:
        return f"<flexq.Queue {self._store!r} workers={self.worker_count}>"

    @property
    def store(self) -> Store:
        """The store this queue keeps its jobs in."""
        return self._store

    @property
    def tasks(self) -> Mapping[str, Task[Any]]:
        """The registered tasks by name."""
        return dict(self._tasks)

    @property
    def flex(self) -> FlexQueue:
        """The holding queues of batch jobs: read and change their order."""
        return FlexQueue(self)

    # -- registration -----------------------------------------------------------------------

    @overload
    def task(self, fn: Handler[R], /) -> Task[R]: ...
    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        priority: int = 0,
        kind: Kind | Literal["future", "queueable"] = Kind.QUEUEABLE,
        backoff: Backoff | None = None,
        callout: bool = False,
    ) -> Callable[[Handler[R2]], Task[R2]]: ...
    def task(
        self,
        fn: Handler[R] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        priority: int = 0,
        kind: Kind | Literal["future", "queueable"] = Kind.QUEUEABLE,
        backoff: Backoff | None = None,
        callout: bool = False,
    ) -> Task[R] | Callable[[Handler[R2]], Task[R2]]:
        """Register an ``async def`` as a task (a decorator, with or without options).

        Args:
            name: the name jobs refer to it by (default: ``module.qualname``).
            retries: extra attempts after a failed one (with ``backoff`` between them).
            timeout: seconds an attempt may run before it is cancelled and counts as failed.
            priority: default priority of its jobs; higher runs first within a tenant.
            kind: ``"queueable"`` (result kept) or ``"future"`` (fire-and-forget: result
                not kept; runs before queueable jobs of equal priority). Both may chain
                children through their context.
            backoff: wait between attempts, instead of the queue's.
            callout: its jobs mostly wait on other services (through ``ctx.http``): they run
                in the callout pool, up to ``callout_concurrency`` at once and fairly between
                tenants, and take no worker from other jobs.
        """

        def register(handler: Handler[R2]) -> Task[R2]:
            task = make_task(
                handler, name=name, kind=kind, retries=retries, timeout=timeout,
                priority=priority, backoff=backoff, callout=callout,
            )  # fmt: skip
            self._register(task)
            return task

        if fn is None:
            return register
        return register(fn)

    def _register(self, task: Task[Any]) -> None:
        if task.name in self._tasks:
            raise InvalidArguments(f"a task named {task.name!r} is already registered")
        self._tasks[task.name] = task

    @overload
    def batch(self, cls: C, /) -> C: ...
    @overload
    def batch(
        self,
        /,
        *,
        scope: int = 200,
        retries: int = 0,
        concurrency: int = 1,
        timeout: float | None = None,
        name: str | None = None,
        priority: int = 0,
        backoff: Backoff | None = None,
    ) -> Callable[[C], C]: ...
    def batch(
        self,
        cls: C | None = None,
        /,
        *,
        scope: int = 200,
        retries: int = 0,
        concurrency: int = 1,
        timeout: float | None = None,
        name: str | None = None,
        priority: int = 0,
        backoff: Backoff | None = None,
    ) -> C | Callable[[C], C]:
        """Register a batch class: ``start`` yields items, ``execute`` runs on each chunk of
        ``scope`` items, ``finish`` runs once at the end (a decorator, with or without options).

        The class is returned unchanged; enqueue it like a task: ``queue.enqueue(Reindex, ...)``.
        Its jobs wait in the tenant's holding queue (HOLDING) for one of the tenant's active
        slots.

        Args:
            scope: items per chunk.
            retries: extra tries of a chunk whose ``execute`` raised (and extra attempts of a
                ``start`` that raised), with ``backoff`` between them. A chunk that fails every
                try is counted as failed and the batch goes on.
            concurrency: chunks of one job that may run at once.
            timeout: seconds one ``execute`` call may run before it counts as a failed try.
            name: the name jobs refer to it by (default: ``module.qualname``).
            priority: default priority of its jobs within the tenant.
            backoff: wait between tries, instead of the queue's.
        """

        def register(batch_class: C) -> C:
            task = make_batch_task(
                batch_class, name=name, scope=scope, retries=retries, concurrency=concurrency,
                timeout=timeout, priority=priority, backoff=backoff,
            )  # fmt: skip
            self._register(task)
            batch_class.__flexq_task__ = task  # type: ignore[attr-defined]
            return batch_class

        if cls is None:
            return register
        return register(cls)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store so this process can enqueue and query (no workers run).

        Raises:
            SchemaVersionError: the store's schema is newer than this flexq's, or (with
                ``migrate=False``) older.
            StoreError: the store cannot be reached.
        """
        if self._open:
            raise FlexqError("the queue is already open")
        await self._store.open()
        self._open = True

    async def close(self) -> None:
        """Close the store; the queue may be opened again.

        Raises:
            FlexqError: workers run (leave ``async with queue:`` instead).
        """
        if self._group is not None:
            raise FlexqError("workers are running: leave `async with queue:` to stop them")
        if not self._open:
            return
        self._open = False
        http, self._http = self._http, None
        try:
            if http is not None:
                await http.aclose()
        finally:
            await self._store.close()

    def _http_client(self) -> httpx.AsyncClient:
        """The shared client of ``ctx.http``, made at its first use while the queue is open."""
        self._check_open()
        if self._http is None:
            # Imported here: httpx takes ~50 ms to import, which queues that never call out
            # (and the CLI) need not pay.
            from flexq._http import open_client

            self._http = open_client(
                connections=self.callout_concurrency + self.worker_count + self.reserved_workers,
                timeout=self.callout_timeout,
            )
        return self._http

    async def __aenter__(self) -> Queue:
        await self.open()
        try:
            await self._start_workers()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stop_workers()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def _start_workers(self) -> None:
        monitor = LoadMonitor(self._max_loop_lag, self._load_probe)
        runner = Runner(
            queue=self, store=self._store, owner=self._owner, tasks=self._tasks,
            workers=self.worker_count, lease=self.lease, backoff=self.backoff, clock=self._clock,
            on_slot_free=self._slot_freed, on_written=self._outcomes_written,
            on_batch_ended=self._batch_ended, on_batch_checkpoint=self._batch_checkpointed,
            reserved=self.reserved_workers, callout_workers=self.callout_concurrency,
        )  # fmt: skip
        dispatcher = Dispatcher(
            store=self._store, runner=runner, owner=self._owner, tasks=self._tasks.keys(),
            fairness=DeficitRoundRobin(self._weights), monitor=monitor, clock=self._clock,
            lease=self.lease, poll_interval=self.poll_interval,
            worker_tasks=TaskNames(self._tasks, callout=False),
            callout_tasks=TaskNames(self._tasks, callout=True),
            callout_fairness=DeficitRoundRobin(self._weights),
            parallel_claims=(
                self._store.parallel_claims if isinstance(self._store, ClaimsInParallel) else 1
            ),
        )  # fmt: skip
        upkeep = Upkeep(
            store=self._store, owner=self._owner, clock=self._clock, lease=self.lease,
            max_lease_expiries=self.max_lease_expiries, retention=self.retention,
            prune_interval=self.prune_interval, held=runner.held_jobs,
            on_renewed=runner.renewed, on_renewal_failed=runner.renewal_failed,
            on_abort_requested=self._abort_held,
            on_recovered=dispatcher.poll_now, worker=self._worker_record(),
        )  # fmt: skip
        self._monitor, self._runner, self._dispatcher, self._upkeep = (
            monitor,
            runner,
            dispatcher,
            upkeep,
        )
        self._dispatcher_done = anyio.Event()
        await upkeep.recover()
        await upkeep.heartbeat()
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(runner.run)
        except BaseException as exc:
            group.cancel_scope.cancel()
            await group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._group = group
        if monitor.enabled:
            group.start_soon(monitor.run)
        group.start_soon(upkeep.maintain_forever)
        group.start_soon(upkeep.prune_forever)
        group.start_soon(self._store.listen, self._work_elsewhere, self._free_workers)
        group.start_soon(self._dispatch, dispatcher, self._dispatcher_done)
        self._scheduler = Scheduler(
            store=self._store, tasks=self._tasks, clock=self._clock,
            poll_interval=self.poll_interval, new_id=new_job_id, on_fired=self._schedule_fired,
        )  # fmt: skip
        group.start_soon(self._scheduler.run)

    @staticmethod
    async def _dispatch(dispatcher: Dispatcher, done: anyio.Event) -> None:
        try:
            await dispatcher.run()
        finally:
            done.set()

    async def _stop_workers(self) -> None:
        group, runner, dispatcher = self._group, self._runner, self._dispatcher
        if group is None or runner is None or dispatcher is None or self._dispatcher_done is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                dispatcher.stop()
                await self._dispatcher_done.wait()
                await runner.drain(self.grace_period)
        finally:
            self._group = None
            self._scheduler = None
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._store.remove_worker(self._owner)

    def _worker_record(self) -> WorkerRecord:
        now = self._clock()
        host, pid = socket.gethostname(), os.getpid()
        return WorkerRecord(self._owner, host, pid, self.worker_count, self.lease, now, now)

    async def workers(self) -> list[WorkerInfo]:
        """The worker processes sharing this store (queues in ``async with``), oldest first.

        Each renews a heartbeat every third of its lease; one that stopped gracefully is gone,
        and one whose process died stays listed, not ``alive`` once two of its leases passed,
        until the retention period has passed.
        """
        self._check_open()
        now = self._clock()
        return [
            WorkerInfo(
                id=record.id,
                host=record.host,
                pid=record.pid,
                workers=record.workers,
                started_at=timestamp_to_datetime(record.started_at),
                last_seen=timestamp_to_datetime(record.last_seen),
                alive=record.last_seen >= now - 2 * record.lease,
            )
            for record in await self._store.list_workers()
        ]

    def _work_elsewhere(self, tenants: list[str] | None, run_at: float | None) -> None:
        """Another process made work ready (heard by the store's ``listen``)."""
        if self._dispatcher is not None:
            if tenants is None:
                self._dispatcher.poll_now()
            else:
                self._dispatcher.notify(tenants, run_at)

    def _free_workers(self) -> int:
        return self._runner.free_slots if self._runner is not None else 0

    def _slot_freed(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.notify()

    def _batch_checkpointed(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.vouch()

    def _batch_ended(self) -> None:
        # The transaction that ended it admitted the tenant's next holding job, if any.
        if self._dispatcher is not None:
            self._dispatcher.poll_now()

    def _outcomes_written(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.state.is_final:
                self._job_finished(outcome.job_id)
                if self._dependants and self._dispatcher is not None:
                    self._dispatcher.poll_now()
            elif outcome.release or self._dispatcher is None:
                continue
            elif outcome.state is State.SCHEDULED:
                self._dispatcher.notify(run_at=outcome.run_at)
            else:
                self._dispatcher.poll_now()

    def _job_finished(self, job_id: JobId) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.event.set()

    def _abort_held(self, job_ids: list[JobId]) -> None:
        if self._runner is not None:
            for job_id in job_ids:
                self._runner.abort(job_id)

    def _check_open(self) -> None:
        if not self._open:
            raise QueueClosed(
                "the queue is not open: use `async with queue:` or `await queue.open()`"
            )

    # -- enqueue ----------------------------------------------------------------------------

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
        kwargs: Mapping[str, JSON] | None = None,
        depends_on: Sequence[JobId] | None = None,
        on_parent_failure: OnParentFailure = "abort",
        not_before: datetime | None = None,
        connection: object | None = None,
    ) -> JobId:
        """Store a job durably and return its id; a worker runs it when its turn comes.

        Args:
            task: the task object or its registered name.
            args: positional arguments for the handler (JSON values).
            tenant: whose job it is, for fairness and control (default ``"default"``).
            priority: higher runs first within the tenant (default: the task's).
            delay: seconds to wait before the job may run; or give ``run_at``.
            run_at: an aware datetime before which the job does not run.
            not_before: the same as ``run_at`` (it reads better beside ``depends_on``: the job
                runs once its parents completed and not before this time); give one of them.
            key: a deduplication key: while a job of the tenant with this key is not final,
                enqueue raises :class:`DuplicateJob` (or returns its id if ``on_duplicate`` is
                ``"return"``).
            kwargs: keyword arguments for the handler (JSON values).
            depends_on: ids of jobs (its parents) that must all be COMPLETED before this one
                may run; until then it is WAITING. It becomes QUEUED (or SCHEDULED until
                ``run_at``/``delay``) in the transaction that completes its last parent.
            on_parent_failure: what a parent that ends FAILED or ABORTED does to this job:
                ``"abort"`` (the default) aborts it, with an error naming the parent;
                ``"run"`` lets it run once its other parents are done.
            connection: the application's own psycopg connection (PostgreSQL store only):
                the job is written in its transaction, so it exists if and only if that
                transaction commits.

        Raises:
            UnknownTask: the task is not registered with this queue.
            InvalidArguments: the arguments or options are not acceptable (not JSON, not
                matching the handler's signature...).
            DuplicateJob: ``key`` is taken by an unfinished job and ``on_duplicate`` is
                ``"raise"``.
            JobNotFound: a job in ``depends_on`` does not exist.
            QueueClosed: the queue is not open.

        Nothing is written when it raises.
        """
        if not_before is not None:
            if run_at is not None:
                raise InvalidArguments("give run_at or not_before (the same thing), not both")
            run_at = not_before
        if depends_on is not None:
            return await self._enqueue_dependent_one(
                task, args, kwargs, tenant=tenant, priority=priority, delay=delay,
                run_at=run_at, key=key, parent_id=None, depends_on=depends_on,
                on_parent_failure=on_parent_failure,
            )  # fmt: skip
        return await self._enqueue_one(
            task, args, kwargs, tenant=tenant, priority=priority, delay=delay, run_at=run_at,
            key=key, on_duplicate=on_duplicate, parent_id=None, connection=connection,
        )  # fmt: skip

    async def enqueue_many(
        self,
        calls: Sequence[Call],
        *,
        tenant: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        on_duplicate: OnDuplicate = "raise",
        connection: object | None = None,
    ) -> list[JobId]:
        """Enqueue many calls in one transaction: all are written, or none.

        Options given here apply to every call unless the call sets its own with
        :meth:`Call.with_options`. Returns the ids in the order of ``calls``. With
        ``connection`` (see :meth:`enqueue`) that transaction is the caller's.
        """
        self._check_open()
        _check_on_duplicate(on_duplicate)
        now = self._clock()
        shared = self._options(tenant, priority, delay, run_at, None, now)
        resolved: dict[int, Task[Any]] = {}
        jobs = []
        for call in calls:
            if not isinstance(call, Call):
                raise InvalidArguments(f"enqueue_many takes flexq.Call objects, not {call!r}")
            spec = resolved.get(id(call.task))
            if spec is None:
                spec = resolved[id(call.task)] = self._resolve(call.task)
            options = shared
            if call.options:
                merged = {"tenant": tenant, "priority": priority, "delay": delay,
                          "run_at": run_at, "key": None, **call.options}  # fmt: skip
                options = self._options(now=now, **merged)
            jobs.append(self._new_job(spec, call.args, call.kwargs, options, None))
        if on_duplicate == "raise":
            keys = [(job.tenant, job.key) for job in jobs if job.key is not None]
            if len(set(keys)) < len(keys):
                raise InvalidArguments("two calls share a tenant and key: each key is unique")
        if not jobs:
            return []
        return await self._submit(jobs, on_duplicate, connection)

    async def _enqueue_one(
        self,
        task: TaskRef,
        args: tuple[JSON, ...],
        kwargs: Mapping[str, JSON] | None,
        *,
        tenant: str | None,
        priority: int | None,
        delay: float | None,
        run_at: datetime | None,
        key: str | None,
        on_duplicate: OnDuplicate,
        parent_id: JobId | None,
        connection: object | None = None,
    ) -> JobId:
        self._check_open()
        _check_on_duplicate(on_duplicate)
        options = self._options(tenant, priority, delay, run_at, key, self._clock())
        job = self._new_job(self._resolve(task), args, kwargs or {}, options, parent_id)
        (job_id,) = await self._submit([job], on_duplicate, connection)
        return job_id

    async def _submit(
        self, jobs: list[NewJob], on_duplicate: OnDuplicate, connection: object | None = None
    ) -> list[JobId]:
        if connection is not None:
            # Not visible before the caller commits: the store's notification wakes workers.
            if not isinstance(self._store, EnqueuesInTransaction):
                raise InvalidArguments(f"{self._store!r} cannot write in a connection= of yours")
            unit = EnqueueUnit(jobs, on_duplicate)
            result = await self._store.enqueue_in(connection, unit, self._clock())
            if isinstance(result, FlexqError):
                raise result
            return result
        result = await self._enqueuer.submit(EnqueueUnit(jobs, on_duplicate))
        if isinstance(result, FlexqError):
            raise result
        return result

    async def _write_units(self, units: list[EnqueueUnit]) -> list[EnqueueResult]:
        """Write the units of a group commit and tell the dispatcher about their jobs; if it
        is idle, the store claims them for its workers in the same round trip."""
        now = self._clock()
        dispatcher = self._dispatcher
        if dispatcher is None:
            return await self._store.enqueue(units, now)
        ready = [job for unit in units for job in unit.jobs if job.run_at <= now]
        claim = None
        claimer = self._claimer
        if ready and claimer is not None:
            claim = dispatcher.claim_on_enqueue(
                {job.tenant for job in ready}, {job.task for job in ready}
            )
        claimed = None
        if claim is None or claimer is None:
            results = await self._store.enqueue(units, now)
        else:
            try:
                results, claimed = await claimer.enqueue_and_claim(units, now, claim)
            finally:
                dispatcher.enqueue_claimed(claim, claimed)
        written = [job for unit, result in zip(units, results, strict=True)
                   if not isinstance(result, FlexqError) for job in unit.jobs]  # fmt: skip
        later = min((job.run_at for job in written if job.run_at > now), default=None)
        if claim is None or claimed is None:
            tenants = {job.tenant for job in written if job.run_at <= now}
            dispatcher.notify(tenants, later, tasks={job.task for job in written})
        elif later is not None:  # the claim dealt with the ready jobs' tenants
            dispatcher.notify(run_at=later)
        return results

    def _resolve(self, task: TaskRef) -> Task[Any]:
        task = getattr(task, "__flexq_task__", task)
        name = task if isinstance(task, str) else getattr(task, "name", None)
        registered = self._tasks.get(name) if isinstance(name, str) else None
        if registered is None or (not isinstance(task, str) and registered is not task):
            raise UnknownTask(
                f"task {name or task!r} is not registered with this queue:"
                " decorate it with @queue.task"
            )
        return registered

    @staticmethod
    def _options(
        tenant: str | None,
        priority: int | None,
        delay: float | None,
        run_at: datetime | None,
        key: str | None,
        now: float,
    ) -> _Options:
        """Validate the enqueue options of one call (or of many that share them)."""
        tenant = DEFAULT_TENANT if tenant is None else tenant
        if not _is_text(tenant, 256):
            raise InvalidArguments(f"tenant must be a non-empty string of <= 256 chars: {tenant!r}")
        if key is not None and not _is_text(key, 512):
            raise InvalidArguments(f"key must be a non-empty string of <= 512 chars: {key!r}")
        if priority is not None:
            check_priority(priority)
        delayed = delay is not None or run_at is not None
        return _Options(tenant, priority, _start_time(now, delay, run_at), key, delayed)

    @staticmethod
    def _new_job(
        spec: Task[Any],
        args: tuple[JSON, ...],
        kwargs: Mapping[str, JSON],
        options: _Options,
        parent_id: JobId | None,
    ) -> NewJob:
        spec.check_arguments(args, kwargs)
        encoded_args, encoded_kwargs = _encoded_arguments(spec.name, args, kwargs)
        if spec.batch is not None and options.delayed:
            raise InvalidArguments(
                f"batch task {spec.name!r} cannot be delayed: batch jobs wait in the holding"
                " queue for a slot, not for a time"
            )
        return NewJob(
            id=new_job_id(),
            task=spec.name,
            kind=spec.kind,
            tenant=options.tenant,
            priority=spec.priority if options.priority is None else options.priority,
            args=encoded_args,
            kwargs=encoded_kwargs,
            max_attempts=spec.max_attempts,
            timeout=spec.timeout if spec.batch is None else None,
            run_at=options.run_at,
            key=options.key,
            parent_id=parent_id,
        )

    # -- queries ----------------------------------------------------------------------------

    async def get(self, job_id: JobId) -> JobInfo:
        """The job as it is now. Raises JobNotFound."""
        self._check_open()
        return await self._store.get(job_id)

    async def get_many(self, job_ids: Sequence[JobId]) -> list[JobInfo]:
        """The jobs among ``job_ids`` that exist, in the order asked (unknown ids left out)."""
        self._check_open()
        found = {info.id: info for info in await self._store.get_many(job_ids)}
        return [found[job_id] for job_id in dict.fromkeys(job_ids) if job_id in found]

    async def wait(self, job_id: JobId, timeout: float | None = None) -> JobInfo:
        """Wait until the job is final and return it.

        Jobs that this process runs are seen at once; others every ``poll_interval``.

        Raises:
            JobNotFound: no job has this id.
            WaitTimeout: the job was not final after ``timeout`` seconds.
        """
        self._check_open()
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                waiter = self._waiters.setdefault(job_id, _Waiter())
                waiter.count += 1
                try:
                    info = await self._store.get(job_id)
                    if info.is_final:
                        return info
                    with anyio.move_on_after(self.poll_interval):
                        await waiter.event.wait()
                finally:
                    waiter.count -= 1
                    if not waiter.count and self._waiters.get(job_id) is waiter:
                        del self._waiters[job_id]
        raise WaitTimeout(f"job {job_id!r} was not final after {timeout} s")

    async def jobs(
        self,
        *,
        tenant: str | None = None,
        state: State | str | None = None,
        kind: Kind | str | None = None,
        task: TaskRef | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
        offset: int = 0,
    ) -> Page:
        """Jobs that match every filter given, oldest first, one page at a time.

        Page with ``cursor=page.next_cursor`` (stable while jobs are added) or with ``offset``.
        """
        self._check_open()
        _check_count("limit", limit, 1, MAX_PAGE)
        _check_count("offset", offset, 0)
        after_seq = None
        if cursor is not None:
            try:
                after_seq = int(cursor)
            except ValueError:
                raise InvalidArguments(f"not a cursor from Page.next_cursor: {cursor!r}") from None
        where = self._filter(tenant, state, kind, task, created_after, created_before)
        rows = await self._store.jobs(where, after_seq=after_seq, offset=offset, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = str(rows[-1][0]) if more else None
        return Page(items=tuple(info for _, info in rows), next_cursor=next_cursor)

    async def counts(
        self,
        *,
        tenant: str | None = None,
        kind: Kind | str | None = None,
        task: TaskRef | None = None,
    ) -> dict[State, int]:
        """How many jobs are in each state (every state is present, zero or not)."""
        self._check_open()
        where = self._filter(tenant, None, kind, task, None, None)
        found = await self._store.counts(where)
        return {state: found.get(state, 0) for state in State}

    def _filter(
        self,
        tenant: str | None,
        state: State | str | None,
        kind: Kind | str | None,
        task: TaskRef | None,
        created_after: datetime | None,
        created_before: datetime | None,
    ) -> JobFilter:
        try:
            state = None if state is None else State(state)
            kind = None if kind is None else Kind(kind)
        except ValueError as exc:
            raise InvalidArguments(str(exc)) from None
        return JobFilter(
            tenant=tenant,
            state=state,
            kind=kind,
            task=task if task is None or isinstance(task, str) else _task_name(task),
            created_after=None if created_after is None else _timestamp(created_after),
            created_before=None if created_before is None else _timestamp(created_before),
        )

    def statistics(self) -> QueueStatistics:
        """A snapshot of this process's workers and dispatcher."""
        runner, monitor = self._runner, self._monitor
        counters = runner.counters if runner is not None else None
        return QueueStatistics(
            workers=self.worker_count,
            running=runner.in_flight if runner is not None else 0,
            claimed=counters.claimed if counters else 0,
            completed=counters.completed if counters else 0,
            failed=counters.failed if counters else 0,
            retried=counters.retried if counters else 0,
            aborted=counters.aborted if counters else 0,
            loop_lag=monitor.lag if monitor is not None else 0.0,
            throttled=monitor.overloaded if monitor is not None else False,
            throttle_events=monitor.episodes if monitor is not None else 0,
            callouts_running=runner.callouts_in_flight if runner is not None else 0,
        )

    # -- control ----------------------------------------------------------------------------

    async def abort(self, job_id: JobId) -> State:
        """Abort a job that is not final.

        A waiting job ends ABORTED at once and never runs. A running job is cancelled by its
        worker (at once in this process, within a third of ``lease`` in another) and then ends
        ABORTED. Returns the job's state after the call.

        Raises:
            JobNotFound: no job has this id.
            IllegalTransition: the job is already final.
        """
        self._check_open()
        state = await self._store.request_abort(job_id, self._clock())
        if state is State.ABORTED:
            self._job_finished(job_id)
            if self._dispatcher is not None:  # an aborted batch job may have freed a slot
                self._dispatcher.poll_now()
        else:
            self._abort_held([job_id])
        return state

    async def pause(self, *, tenant: str | None = None, task: TaskRef | None = None) -> bool:
        """Stop claiming new jobs of a tenant, of a task, or (with neither) of the whole queue.

        Running jobs go on. The pause is stored, so every process sharing the store obeys it
        until :meth:`resume`. Returns whether it was not paused already.
        """
        self._check_open()
        scope, name = self._pause_target(tenant, task)
        return await self._store.set_pause(scope, name, True, self._clock())

    async def resume(self, *, tenant: str | None = None, task: TaskRef | None = None) -> bool:
        """Lift a pause set by :meth:`pause` with the same arguments; return whether one was."""
        self._check_open()
        scope, name = self._pause_target(tenant, task)
        changed = await self._store.set_pause(scope, name, False, self._clock())
        if self._dispatcher is not None:
            self._dispatcher.poll_now()
        return changed

    async def paused(self) -> list[Pause]:
        """Every pause in force."""
        self._check_open()
        return await self._store.pauses()

    @staticmethod
    def _pause_target(tenant: str | None, task: TaskRef | None) -> tuple[PauseScope, str]:
        if tenant is not None and task is not None:
            raise InvalidArguments("pause a tenant or a task, not both at once")
        if tenant is not None:
            return PauseScope.TENANT, tenant
        if task is not None:
            return PauseScope.TASK, _task_name(task)
        return PauseScope.QUEUE, ""

    # -- batch jobs: limits and explanations --------------------------------------------------

    def limits_of(self, tenant: str) -> Limits:
        """The limits configured for ``tenant`` (its override, or the queue's)."""
        return self._limits(tenant)

    async def limits(self, tenant: str) -> LimitUsage:
        """The tenant's limits and its use of them now (holding n/100, active n/5)."""
        self._check_open()
        holding, active = await self._store.usage(tenant)
        return LimitUsage(tenant, self._limits(tenant), holding, active)

    async def explain(self, job_id: JobId) -> Explanation:
        """Why the job is not running (or that it is, or is final), reason by reason.

        Reasons: its place in the holding queue and the tenant's active slots in use, the
        parents it waits for (``depends_on``), a ``run_at`` not reached, a pause of the queue,
        tenant or task, this process's dispatcher throttled by host load or its workers all
        busy, jobs ahead of it in its tenant and other tenants sharing the workers, a task this
        process does not run. Raises JobNotFound.
        """
        self._check_open()
        facts = await self._store.wait_facts(job_id)
        working = self._group is not None
        runner = self._runner if working else None
        monitor = self._monitor if working else None
        task = self._tasks.get(facts.info.task)
        callout = task is not None and task.callout
        busy = 0
        if runner is not None:
            in_callout_pool = runner.callouts_in_flight
            busy = in_callout_pool if callout else runner.in_flight - in_callout_pool
        local = LocalFacts(
            now=self._clock(),
            limits=self._limits(facts.info.tenant),
            runs_task=task is not None,
            has_workers=runner is not None,
            workers=self.callout_concurrency if callout else self.worker_count,
            busy_workers=busy,
            throttled=monitor.overloaded if monitor is not None else False,
            loop_lag=monitor.lag if monitor is not None else 0.0,
        )
        parents: list[JobId] = []
        if facts.info.state is State.WAITING:
            parents = await self._store.waiting_for(job_id)
        return explain(facts, local, parents)

    # -- schedules --------------------------------------------------------------------------

    async def schedule(
        self,
        name: str,
        cron: str,
        task: TaskRef,
        *args: JSON,
        tenant: str | None = None,
        timezone: str = "UTC",
        misfire: Misfire = DEFAULT_MISFIRE,
        reserve: bool = False,
        kwargs: Mapping[str, JSON] | None = None,
    ) -> ScheduleInfo:
        """Create the cron schedule ``name``, or update it: each fire time enqueues one job.

        Calling it again with the same name updates the schedule in place (tenant, task,
        arguments, expression, zone, misfire policy) without losing its state or history, so
        an application may declare its schedules at every start. The next fire time is kept
        unless the expression or the zone changed. Jobs are of kind ``scheduled``; their
        ``run_at`` is the fire time they stand for.

        Args:
            name: the schedule's unique name.
            cron: five fields (minute hour day month weekday), or six with seconds first
                (``"*/5 * * * * *"``: every five seconds).
            task: the task object or its registered name.
            args: positional arguments for every job (JSON values).
            tenant: whose jobs they are (default ``"default"``).
            timezone: the IANA zone the expression reads its wall clock in.
            misfire: what happens to fire times missed while no process ran the schedule
                (it was down, say): ``"run_once"`` (the default) enqueues one catch-up job,
                ``"run_all"`` one job per missed time (at most 100), ``"skip"`` none, except
                for a time less than a minute late.
            reserve: guarantee capacity: the job starts on one of the queue's
                ``reserved_workers`` (kept free for such jobs) as soon as it is enqueued,
                ahead of every tenant's turn, even when all ``workers`` are busy and the
                host is throttled. It starts within a few store round trips of its fire time
                in the process that fires it, while fewer than ``reserved_workers`` reserved
                jobs run there.
            kwargs: keyword arguments for every job (JSON values).

        Raises:
            InvalidArguments: the expression, zone, policy, name or arguments are not valid.
            UnknownTask: the task is not registered with this queue.
        """
        self._check_open()
        if not _is_text(name, 256):
            raise InvalidArguments(f"a schedule name is a non-empty string (<= 256): {name!r}")
        spec = self._resolve(task)
        options = self._options(tenant, None, None, None, None, self._clock())
        policy = check_misfire(misfire)
        if not isinstance(reserve, bool):
            raise InvalidArguments(f"reserve must be True or False, not {reserve!r}")
        times = Cron(cron, timezone)
        next_fire_time = times.next_after(self._clock())
        if next_fire_time is None:
            raise InvalidArguments(f"the cron expression {cron!r} never fires")
        spec.check_arguments(args, kwargs or {})
        encoded_args, encoded_kwargs = _encoded_arguments(spec.name, args, kwargs or {})
        record = ScheduleRecord(
            name=name, tenant=options.tenant, cron=times.expression, timezone=timezone,
            task=spec.name, args=encoded_args, kwargs=encoded_kwargs, misfire=policy,
            reserve=reserve,
            state=ScheduleState.ACTIVE, next_fire_time=next_fire_time,
        )  # fmt: skip
        stored = await self._store.put_schedule(record, self._clock())
        if self._scheduler is not None:
            self._scheduler.wake()
        return schedule_info(stored)

    async def schedules(self, *, tenant: str | None = None) -> list[ScheduleInfo]:
        """Every schedule (of ``tenant``, if given), by name."""
        self._check_open()
        return [schedule_info(record) for record in await self._store.list_schedules(tenant)]

    async def get_schedule(self, name: str) -> ScheduleInfo:
        """The schedule named ``name``.

        Raises:
            ScheduleNotFound: there is none.
        """
        self._check_open()
        return schedule_info(await self._stored_schedule(name))

    async def pause_schedule(self, name: str) -> ScheduleInfo:
        """Stop a schedule from firing until :meth:`resume_schedule`.

        Raises:
            ScheduleNotFound: there is no schedule of that name.
        """
        return await self._set_schedule_state(name, ScheduleState.PAUSED)

    async def resume_schedule(self, name: str) -> ScheduleInfo:
        """Let a paused schedule fire again, from its next fire time after now: the times it
        missed while paused are not caught up.

        Raises:
            ScheduleNotFound: there is no schedule of that name.
        """
        return await self._set_schedule_state(name, ScheduleState.ACTIVE)

    async def unschedule(self, name: str) -> bool:
        """Delete a schedule (its jobs stay); return whether it existed."""
        self._check_open()
        return await self._store.delete_schedule(name)

    async def _stored_schedule(self, name: str) -> ScheduleRecord:
        record = await self._store.get_schedule(name)
        if record is None:
            raise ScheduleNotFound(name)
        return record

    async def _set_schedule_state(self, name: str, state: ScheduleState) -> ScheduleInfo:
        self._check_open()
        while True:
            record = await self._stored_schedule(name)
            if record.state == state:
                return schedule_info(record)
            next_fire_time = record.next_fire_time
            if state is ScheduleState.ACTIVE:
                next_fire_time = Cron(record.cron, record.timezone).next_after(self._clock())
            stored = await self._store.set_schedule_state(
                name, record.revision, state, next_fire_time
            )
            if stored is not None:
                if self._scheduler is not None:
                    self._scheduler.wake()
                return schedule_info(stored)

    def _schedule_fired(self, jobs: list[NewJob], reserve: bool) -> None:
        if self._dispatcher is not None:
            self._dispatcher.notify({job.tenant for job in jobs}, tasks={job.task for job in jobs})
            if reserve:
                self._dispatcher.run_reserved(job.id for job in jobs)

    # -- chains and dependencies ------------------------------------------------------------

    async def enqueue_chain(
        self,
        calls: Sequence[Call],
        *,
        tenant: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        depends_on: Sequence[JobId] = (),
    ) -> list[JobId]:
        """Enqueue calls that run one after another, each once the one before COMPLETED.

        Each step is a child of the step before (``parent_id``), waits for it (WAITING), and
        can read its result with :meth:`Context.previous_result`. If a step ends FAILED or
        ABORTED, the steps after it end ABORTED. The first step waits for the jobs in
        ``depends_on`` (a fan-in), as :meth:`enqueue` does. All steps are written in one
        transaction. Options given here apply to every step unless a call sets its own with
        :meth:`Call.with_options` (``delay``/``run_at`` hold a step back after its turn
        comes; keys are not allowed). Returns the ids in order.

        Raises:
            JobNotFound: a job in ``depends_on`` does not exist.
        """
        self._check_open()
        first_parents = _parent_ids(depends_on)
        now = self._clock()
        shared = self._options(tenant, priority, delay, run_at, None, now)
        steps: list[DependentJob] = []
        for call in calls:
            if not isinstance(call, Call):
                raise InvalidArguments(f"enqueue_chain takes flexq.Call objects, not {call!r}")
            options = shared
            if call.options:
                if "key" in call.options:
                    raise InvalidArguments("the steps of a chain cannot have keys")
                merged = {"tenant": tenant, "priority": priority, "delay": delay,
                          "run_at": run_at, "key": None, **call.options}  # fmt: skip
                options = self._options(now=now, **merged)
            parent = steps[-1].job.id if steps else None
            job = self._new_job(self._resolve(call.task), call.args, call.kwargs, options, parent)
            steps.append(DependentJob(job, first_parents if parent is None else (parent,)))
        if not steps:
            return []
        return await self._submit_dependent(steps)

    async def chain(self, job_id: JobId) -> list[JobInfo]:
        """The job's whole chain: its ancestors and descendants by ``parent_id`` (children
        enqueued through :meth:`Context.enqueue`, steps of :meth:`enqueue_chain`), oldest first.

        Raises:
            JobNotFound: no job has this id.
        """
        self._check_open()
        return await self._store.chain(job_id)

    async def waiting_for(self, job_id: JobId) -> list[JobId]:
        """The parents a WAITING job still waits for (empty once it is released).

        Raises:
            JobNotFound: no job has this id.
        """
        self._check_open()
        return await self._store.waiting_for(job_id)

    async def _enqueue_dependent_one(
        self,
        task: TaskRef,
        args: tuple[JSON, ...],
        kwargs: Mapping[str, JSON] | None,
        *,
        tenant: str | None,
        priority: int | None,
        delay: float | None,
        run_at: datetime | None,
        key: str | None,
        parent_id: JobId | None,
        depends_on: Sequence[JobId],
        on_parent_failure: OnParentFailure,
    ) -> JobId:
        self._check_open()
        if key is not None:
            raise InvalidArguments("a job with depends_on cannot have a key")
        policy = _check_on_parent_failure(on_parent_failure)
        parents = _parent_ids(depends_on)
        options = self._options(tenant, priority, delay, run_at, None, self._clock())
        job = self._new_job(self._resolve(task), args, kwargs or {}, options, parent_id)
        (job_id,) = await self._submit_dependent([DependentJob(job, parents, policy)])
        return job_id

    async def _submit_dependent(self, jobs: list[DependentJob]) -> list[JobId]:
        self._dependants = True
        ids = await self._store.enqueue_dependent(jobs, self._clock())
        if self._dispatcher is not None:
            self._dispatcher.notify({dependent.job.tenant for dependent in jobs})
        return ids


def _encoded_arguments(
    task: str, args: tuple[JSON, ...], kwargs: Mapping[str, JSON]
) -> tuple[str, str]:
    """A job's arguments as JSON, within MAX_ARGUMENTS_BYTES, or InvalidArguments."""
    encoded_args = dumps(args, "task arguments") if args else "[]"
    encoded_kwargs = dumps(kwargs, "task keyword arguments") if kwargs else "{}"
    size = len(encoded_args) + len(encoded_kwargs)
    if size > MAX_ARGUMENTS_BYTES:
        raise InvalidArguments(
            f"the arguments of a {task!r} job are {size:,} bytes of JSON, more than the"
            f" {MAX_ARGUMENTS_BYTES:,} a job may carry: pass a reference (an id, a path) to the"
            " data instead"
        )
    return encoded_args, encoded_kwargs


def _task_name(task: TaskRef) -> str:
    named = getattr(task, "__flexq_task__", task)
    return named if isinstance(named, str) else str(getattr(named, "name", named))


def _check_count(name: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):  # type: ignore[operator]
        bound = f" and <= {high}" if high is not None else ""
        raise InvalidArguments(f"{name} must be an int >= {low}{bound}, not {value!r}")


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):  # type: ignore[arg-type, operator]
        raise InvalidArguments(f"{name} must be a positive number of seconds, not {value!r}")


def _is_text(value: object, max_length: int) -> bool:
    """A non-empty string of at most ``max_length`` characters that UTF-8 can encode, without
    NUL (which PostgreSQL's text cannot hold)."""
    if not isinstance(value, str) or not value or len(value) > max_length or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _parent_ids(depends_on: Sequence[JobId]) -> tuple[JobId, ...]:
    if isinstance(depends_on, str):
        raise InvalidArguments("depends_on is a list of job ids, not one id")
    parents = tuple(dict.fromkeys(depends_on))
    if not all(isinstance(parent, str) for parent in parents):
        raise InvalidArguments(f"depends_on must hold job ids (strings): {depends_on!r}")
    return parents


def _check_on_parent_failure(policy: object) -> OnParentFailure:
    if policy == "abort":
        return "abort"
    if policy == "run":
        return "run"
    raise InvalidArguments(f"on_parent_failure must be 'abort' or 'run', not {policy!r}")


def _check_on_duplicate(on_duplicate: object) -> None:
    if on_duplicate not in ("raise", "return"):
        raise InvalidArguments(f"on_duplicate must be 'raise' or 'return', not {on_duplicate!r}")


def _timestamp(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise InvalidArguments(f"use an aware datetime (with tzinfo), not {moment!r}")
    return moment.timestamp()


LATEST = datetime(9000, 1, 1, tzinfo=UTC).timestamp()
"""The latest run_at a job may have (dates past year 9999 do not exist)."""


def _start_time(now: float, delay: float | None, run_at: datetime | None) -> float:
    if delay is not None and run_at is not None:
        raise InvalidArguments("give delay or run_at, not both")
    start = now
    if delay is not None:
        _check_seconds("delay", delay, allow_zero=True)
        start = now + delay
    elif run_at is not None:
        if not isinstance(run_at, datetime):
            raise InvalidArguments(f"run_at must be a datetime, not {run_at!r}")
        start = _timestamp(run_at)
    if start > LATEST:
        raise InvalidArguments("a job may not wait past the year 9000")
    return start
