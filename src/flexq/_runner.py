"""The runner: long-lived worker tasks that execute claimed jobs and report how they ended."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import traceback
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from flexq._batch import BatchRun
from flexq._callouts import current_tally
from flexq._context import Context
from flexq._errors import InvalidArguments, JobTimeout, NotRetried, qualified_name
from flexq._parking import ParkingLot, parking_lot
from flexq._serialize import dumps, loads
from flexq._states import Kind, State
from flexq._store.base import ClaimedJob, Outcome, error_record

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from flexq._backoff import Backoff
    from flexq._models import JobId
    from flexq._queue import Queue
    from flexq._store.base import Store
    from flexq._task import Task

log = structlog.get_logger("flexq")

WORK_SLICE = 0.001
"""How long, in seconds, a worker with more jobs ready runs them back to back before it lets
the event loop's other tasks run (jobs that suspend let them run anyway). A yield after every
job costs a round of the event loop per job: up to a fifth of a no-op job's cost."""
LEASE_CHECKS = 20
"""How often per lease, while renewals fail (the database is away), the runner looks for
running jobs whose lease would run out within two looks, to stop them before another process
may take them over."""


@dataclasses.dataclass(slots=True, eq=False)
class _Pool:
    """Worker tasks that share one limit on the jobs they run at once, and those jobs."""

    size: int
    """Jobs it runs at once (the runner's reserved workers come on top of the main pool's)."""
    ready: collections.deque[_Attempt] = dataclasses.field(default_factory=collections.deque)
    parked: ParkingLot = dataclasses.field(default_factory=parking_lot)
    """Its idle worker tasks."""
    in_flight: int = 0
    unwritten: int = 0
    """Jobs it ran whose outcome is not yet written: their leases are still held."""
    started: int = 0
    """Worker tasks started (the callout pool starts them as jobs come, up to its size)."""


@dataclasses.dataclass(slots=True, eq=False)
class _Attempt:
    job: ClaimedJob
    pool: _Pool
    lease_until: float
    """When its lease runs out unless renewed, on the event loop's clock."""
    handed_at: float
    """When it was handed to the workers, on the event loop's clock."""
    scope: anyio.CancelScope | None = None
    """The scope of the worker while it runs this attempt's handler."""
    started: bool = False
    stop: str | None = None
    """Why the attempt was stopped from outside: "abort", "shutdown" or "lease"."""
    callouts: int = 0
    """Requests the handler made through ``ctx.http``."""
    unwritten: bool = False
    """Its outcome waits to be written."""

    def cancel(self, reason: str) -> None:
        if self.stop is None:
            self.stop = reason
            if self.scope is not None:
                self.scope.cancel()


@dataclasses.dataclass(slots=True)
class RunnerCounters:
    """What the runner has done since it started."""

    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    aborted: int = 0


class Runner:
    """Executes jobs on a fixed pool of worker tasks and reports outcomes in group commits.

    Jobs of callout tasks run in a second pool, of up to ``callout_workers`` tasks started as
    such jobs come: they mostly wait on the network and take no worker from the others.

    A job's outcome is handed to the reporter and the worker moves on at once; until the
    outcome is written the job stays under this process's lease, so a crash in between re-runs
    it (at-least-once) and never loses it. A pool takes no new job while it has as many
    unwritten outcomes as places and no free one, so a process never holds more than twice its
    workers' jobs: the most a crash can make run again.

    While renewals fail (the database is away), a running job whose lease would run out is
    stopped before another process may take it over, and released like a job stopped at
    shutdown: if the lease is still this process's when the database is back, the job is
    queued again; if not, another process recovered it: it does not run twice at once. A
    renewal that is merely slow, not failed, stops nothing. A running job whose lease a
    renewal finds lost (another process recovered it) is stopped, and nothing is written for it.
    """

    def __init__(
        self,
        *,
        queue: Queue,
        store: Store,
        owner: str,
        tasks: Mapping[str, Task[Any]],
        workers: int,
        lease: float,
        backoff: Backoff,
        clock: Callable[[], float],
        on_slot_free: Callable[[], None],
        on_written: Callable[[list[Outcome]], None],
        on_batch_ended: Callable[[], None],
        on_batch_checkpoint: Callable[[], None],
        reserved: int = 0,
        callout_workers: int = 0,
    ) -> None:
        self._queue = queue
        self._store = store
        self._owner = owner
        self._tasks = tasks
        self.workers = workers
        self.reserved = reserved
        """Extra workers that only jobs handed over by :meth:`Dispatcher.run_reserved` reach."""
        self._lease = lease
        self._backoff = backoff
        self._clock = clock
        self._on_slot_free = on_slot_free
        self._on_written = on_written
        self._on_batch_ended = on_batch_ended
        self._on_batch_checkpoint = on_batch_checkpoint
        self._batches: set[JobId] = set()
        """Batch jobs held, until their outcome is written."""
        self._main = _Pool(workers)
        self._callouts = _Pool(callout_workers)
        self._group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._in_flight = 0
        self._idle = anyio.Event()
        self._held: dict[JobId, _Attempt] = {}
        """Attempts handed over and not yet ended."""
        self._leases: dict[JobId, _Attempt] = {}
        """Attempts whose lease this runner holds: not yet ended, or their outcome unwritten."""
        self._renewals_failing = anyio.Event()
        """Set while the last renewal failed: the lease guard watches only then."""
        self._outbox: list[Outcome] = []
        self._outbox_ready = anyio.Event()
        self._report_lock = anyio.Lock()
        self.counters = RunnerCounters()

    @property
    def free_slots(self) -> int:
        """Workers that have no job, counting jobs already handed over as taken, and none
        while the outcomes not yet written fill the rest of twice the workers."""
        return _free(self._main, self.workers)

    @property
    def reserved_free(self) -> int:
        """Reserved workers that have no job (other jobs never take more than ``workers``)."""
        return min(self.reserved, self.workers + self.reserved - self._main.in_flight)

    @property
    def callout_free(self) -> int:
        """Places in the callout pool that have no job."""
        return _free(self._callouts, self._callouts.size)

    @property
    def callouts_in_flight(self) -> int:
        """Jobs the callout pool holds."""
        return self._callouts.in_flight

    @property
    def in_flight(self) -> int:
        """Jobs this runner holds: handed over and not yet reported."""
        return self._in_flight

    def submit(self, jobs: list[ClaimedJob], *, claimed_at: float, callout: bool = False) -> None:
        """Hand claimed jobs to the workers, or with ``callout`` to the callout pool; never
        more than :attr:`free_slots` (:attr:`callout_free`).

        ``claimed_at`` is when the claim began (``anyio.current_time()``): their leases run
        from then.
        """
        pool = self._callouts if callout else self._main
        if not self._leases.keys().isdisjoint(job.id for job in jobs):
            # Claimed again, so the lease of the earlier attempt was lost.
            self._forget([job.id for job in jobs if job.id in self._leases])
        now = anyio.current_time()
        attempts = [_Attempt(job, pool, claimed_at + self._lease, now) for job in jobs]
        for attempt in attempts:
            job = attempt.job
            self._in_flight += 1
            pool.in_flight += 1
            if self._idle.is_set():
                self._idle = anyio.Event()
            self._held[job.id] = self._leases[job.id] = attempt
            if job.kind is Kind.BATCH:
                self._batches.add(job.id)
        pool.ready.extend(attempts)
        woken = min(len(jobs), len(pool.parked))
        pool.parked.unpark(count=woken)
        if self._group is not None:
            for _ in range(min(len(jobs) - woken, pool.size - pool.started)):
                pool.started += 1
                self._group.start_soon(self._work, pool)
        self.counters.claimed += len(jobs)

    def held_jobs(self) -> list[JobId]:
        """The jobs whose lease this runner holds, to renew."""
        return list(self._leases)

    def renewed(self, job_ids: list[JobId], since: float, lost: list[JobId]) -> None:
        """The leases of ``job_ids`` were renewed by a call that began at ``since``, except
        those of ``lost``, which this process no longer holds: another process recovered them
        (and may run them now), or they ended. Their attempts still running are stopped."""
        if self._renewals_failing.is_set():
            self._renewals_failing = anyio.Event()
        gone = set(lost)
        # A job claimed again after the renewal began is a new attempt, held by this process.
        stopped = [
            job_id for job_id in lost
            if (attempt := self._held.get(job_id)) is not None and attempt.handed_at < since
        ]  # fmt: skip
        if stopped:
            log.warning("stopping jobs whose lease this process lost", jobs=stopped)
            self._forget(stopped)
        until = since + self._lease
        for job_id in job_ids:
            attempt = self._leases.get(job_id)
            if attempt is not None and job_id not in gone and attempt.lease_until < until:
                attempt.lease_until = until

    def renewal_failed(self) -> None:
        """The last attempt to renew the leases failed."""
        self._renewals_failing.set()

    async def _guard_leases(self) -> None:
        """Stop the running jobs whose lease may run out before it is renewed."""
        while True:
            await self._renewals_failing.wait()
            await anyio.sleep(self._lease / LEASE_CHECKS)
            if not self._renewals_failing.is_set():
                continue
            deadline = anyio.current_time() + 2 * self._lease / LEASE_CHECKS
            expiring = [
                attempt for attempt in self._held.values()
                if attempt.lease_until <= deadline and attempt.stop is None
            ]  # fmt: skip
            if expiring:
                log.warning("stopping jobs whose lease could not be renewed in time",
                            jobs=[attempt.job.id for attempt in expiring])  # fmt: skip
                for attempt in expiring:
                    attempt.cancel("lease")

    def _forget(self, job_ids: list[JobId]) -> None:
        """This runner's leases on these jobs were lost: stop their attempts, drop their
        outcomes."""
        for job_id in job_ids:
            attempt = self._leases.get(job_id)
            if attempt is not None:
                self._drop_lease(attempt)
                attempt.cancel("lease")
            self._batches.discard(job_id)
        lost = set(job_ids)
        self._outbox = [outcome for outcome in self._outbox if outcome.job_id not in lost]

    def abort(self, job_id: JobId) -> bool:
        """Cancel the job if this runner holds it; return whether it did."""
        attempt = self._held.get(job_id)
        if attempt is None:
            return False
        attempt.cancel("abort")
        return True

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workers and the reporter until cancelled."""
        try:
            async with anyio.create_task_group() as group:
                self._main.started = self.workers + self.reserved
                for _ in range(self._main.started):
                    group.start_soon(self._work, self._main)
                group.start_soon(self._report_forever)
                group.start_soon(self._guard_leases)
                self._group = group
                task_status.started()
        finally:
            self._group = None
            # However the workers ended, no job may stay held by nobody: release the rest.
            self._closed = True
            for attempt in list(self._held.values()):
                attempt.stop = attempt.stop or "shutdown"
                self._finish(attempt, interrupted=True)

    async def drain(self, grace_period: float) -> None:
        """Stop taking jobs, let running ones finish for ``grace_period``, release the rest."""
        self._closed = True
        self._main.parked.unpark_all()
        self._callouts.parked.unpark_all()
        for attempt in list(self._held.values()):
            if not attempt.started:
                attempt.cancel("shutdown")
        if self._in_flight:
            with anyio.move_on_after(grace_period):
                await self._idle.wait()
        for attempt in list(self._held.values()):
            attempt.cancel("shutdown")
        if self._in_flight:
            with anyio.move_on_after(grace_period):
                await self._idle.wait()
        await self._report()

    # -- workers ----------------------------------------------------------------------------

    async def _work(self, pool: _Pool) -> None:
        # A worker runs inside a cancel scope that lasts until an attempt is stopped from
        # outside (abort, shutdown); then it starts a new one. One scope per job would cost
        # more than the no-op job it guards.
        current: list[_Attempt] = []
        try:
            while True:
                with anyio.CancelScope() as scope:
                    if await self._work_in(pool, scope, current):
                        return
                    continue
                if current:
                    self._finish(current.pop(), interrupted=True)
        finally:
            if current:  # cancelled from outside the queue: the attempt goes back to the queue
                attempt = current.pop()
                attempt.stop = attempt.stop or "shutdown"
                self._finish(attempt, interrupted=True)

    async def _work_in(
        self, pool: _Pool, scope: anyio.CancelScope, current: list[_Attempt]
    ) -> bool:
        """Run jobs until closed (True) or until the scope must be replaced (False)."""
        yield_at = 0.0
        while True:
            if not pool.ready:
                if self._closed:
                    return True
                await pool.parked.park()
                yield_at = time.monotonic() + WORK_SLICE
                continue
            attempt = pool.ready.popleft()
            if attempt.stop is not None:
                self._finish(attempt, interrupted=True)
                continue
            attempt.started = True
            attempt.scope = scope
            current.append(attempt)
            result, error = await self._call(attempt)
            current.clear()
            attempt.scope = None
            self._finish(attempt, result, error)
            if scope.cancel_called:
                return False
            if pool.ready and time.monotonic() >= yield_at:  # else it parks, letting others run
                await anyio.lowlevel.checkpoint()
                yield_at = time.monotonic() + WORK_SLICE

    def _finish(
        self,
        attempt: _Attempt,
        result: str | None = None,
        error: BaseException | None = None,
        *,
        interrupted: bool = False,
    ) -> None:
        job = attempt.job
        if self._held.get(job.id) is attempt:
            del self._held[job.id]
        if self._leases.get(job.id) is attempt:
            outcome = self._outcome(attempt, result, error, interrupted)
            if attempt.callouts:
                outcome = outcome._replace(callouts=attempt.callouts)
            attempt.unwritten = True
            attempt.pool.unwritten += 1
            self._outbox.append(outcome)
            self._outbox_ready.set()
        self._in_flight -= 1
        attempt.pool.in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        self._on_slot_free()

    def _outcome(
        self, attempt: _Attempt, result: str | None, error: BaseException | None, interrupted: bool
    ) -> Outcome:
        job = attempt.job
        # A stop counts unless the handler ran to its end regardless (it returned a value).
        stopped = interrupted or error is not None or not attempt.started
        if stopped and attempt.stop in ("shutdown", "lease"):
            return Outcome(job.id, State.QUEUED, release=True)
        if stopped and attempt.stop == "abort":
            self.counters.aborted += 1
            log.info("job aborted", job_id=job.id, tenant=job.tenant, task=job.task,
                     attempt=job.attempt)  # fmt: skip
            return Outcome(job.id, State.ABORTED)
        if error is None:
            self.counters.completed += 1
            return Outcome(job.id, State.COMPLETED, result=result)
        return self._failure(job, error)

    async def _call(self, attempt: _Attempt) -> tuple[str | None, BaseException | None]:
        job = attempt.job
        task = self._tasks[job.task]
        try:
            if task.batch is not None:
                return await BatchRun(
                    queue=self._queue, store=self._store, owner=self._owner, task=task, job=job,
                    backoff=self._backoff, clock=self._clock,
                    on_checkpoint=self._on_batch_checkpoint,
                ).run(), None  # fmt: skip
            context = None
            if task.context_parameter is not None:
                context = Context(self._queue, job, self._owner)
            args, kwargs = task.arguments(
                context,
                loads(job.args) if job.args != "[]" else [],
                loads(job.kwargs) if job.kwargs != "{}" else {},
            )
            tally = None if context is None else current_tally.set(context.callout_tally)
            try:
                if job.timeout is None:
                    value = await task.fn(*args, **kwargs)
                else:
                    with anyio.move_on_after(job.timeout) as limit:
                        value = await task.fn(*args, **kwargs)
                    if limit.cancelled_caught:
                        raise JobTimeout(
                            f"attempt {job.attempt} ran over its {job.timeout} s timeout"
                        )
            finally:
                if context is not None and tally is not None:
                    current_tally.reset(tally)
                    attempt.callouts = context.callouts
        except Exception as exc:
            return None, exc
        except anyio.get_cancelled_exc_class() as exc:
            if not _stray_cancellation():
                raise
            return None, exc
        if job.kind is Kind.FUTURE or value is None:
            return None, None
        try:
            return dumps(value, "a task's return value"), None
        except InvalidArguments as exc:
            return None, NotRetried(exc)

    def _failure(self, job: ClaimedJob, error: BaseException) -> Outcome:
        now = self._clock()
        task = self._tasks[job.task]
        final = isinstance(error, NotRetried)
        if isinstance(error, NotRetried):
            error = error.error
        record = dumps(
            error_record(
                qualified_name(type(error)),
                str(error),
                "".join(traceback.format_exception(error)),
                job.attempt,
                now,
            ),
            "error",
        )
        fields = {"job_id": job.id, "tenant": job.tenant, "task": job.task, "attempt": job.attempt}
        if job.attempt < job.max_attempts and not final:
            delay = (task.backoff or self._backoff).delay(job.attempt)
            self.counters.retried += 1
            log.warning("job attempt failed, will retry", delay=round(delay, 3),
                        error=repr(error), **fields)  # fmt: skip
            state = State.SCHEDULED if delay > 0 else State.QUEUED
            return Outcome(job.id, state, error=record, run_at=now + delay)
        self.counters.failed += 1
        log.error("job failed", error=repr(error), **fields)
        return Outcome(job.id, State.FAILED, error=record)

    # -- reporting --------------------------------------------------------------------------

    def _drop_lease(self, attempt: _Attempt) -> None:
        """The lease of ``attempt`` is no longer this runner's: its outcome was written, or
        another process took the job over."""
        del self._leases[attempt.job.id]
        if attempt.unwritten:
            attempt.unwritten = False
            attempt.pool.unwritten -= 1

    async def _report_forever(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = anyio.Event()
            await self._report()

    async def _report(self) -> None:
        async with self._report_lock:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                holders = [self._leases.get(outcome.job_id) for outcome in batch]
                try:
                    with anyio.CancelScope(shield=True):
                        written = set(await self._store.report(self._owner, batch, self._clock()))
                except Exception as exc:
                    log.error("could not report job outcomes, retrying", error=repr(exc),
                              jobs=len(batch))  # fmt: skip
                    # Those forgotten meanwhile are not tried again.
                    again = zip(batch, holders, strict=True)
                    self._outbox[:0] = [
                        outcome for outcome, holder in again
                        if self._leases.get(outcome.job_id) is holder
                    ]  # fmt: skip
                    await anyio.sleep(0.5)
                    continue
                for outcome, holder in zip(batch, holders, strict=True):
                    if holder is not None and self._leases.get(outcome.job_id) is holder:
                        self._drop_lease(holder)
                self._on_slot_free()
                self._on_written([outcome for outcome in batch if outcome.job_id in written])
                if self._batches and any(o.job_id in self._batches for o in batch):
                    self._batches.difference_update(o.job_id for o in batch)
                    self._on_batch_ended()


def _free(pool: _Pool, places: int) -> int:
    return max(min(places - pool.in_flight, 2 * places - pool.in_flight - pool.unwritten), 0)


def _stray_cancellation() -> bool:
    """Whether a cancellation exception came from the handler's own code, not a cancel scope.

    Under asyncio a handler may raise CancelledError by awaiting a future someone else
    cancelled; that is the handler's failure. A real cancellation of this task has a pending
    cancel request. (trio's Cancelled cannot be raised by user code.)
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() == 0
