"""The dispatcher: decides which jobs this process claims next, fairly between tenants."""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING

import anyio
import structlog

from flexq._backoff import retry_pause
from flexq._store.base import ClaimRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping
    from collections.abc import Set as AbstractSet

    from flexq._fairness import DeficitRoundRobin
    from flexq._models import JobId
    from flexq._runner import Runner
    from flexq._store.base import ClaimedJob, Store
    from flexq._throttle import LoadMonitor

log = structlog.get_logger("flexq")

SHARED_CLAIM_FLOOR = 64
"""Claims made side by side share the free places, but none asks for fewer than this (or
than all of them): a smaller claim costs about its round trip, and splitting it gains nothing."""


@dataclasses.dataclass(slots=True, eq=False)
class _Pool:
    """The runner's workers, or its callout pool: the tasks whose jobs it runs, and the turns
    of the tenants that have such jobs ready."""

    tasks: AbstractSet[str]
    fairness: DeficitRoundRobin
    callout: bool
    promised: int = 0
    """Its places promised to claims in flight: the dispatcher's, and those made on enqueue."""


class Dispatcher:
    """Claims ready jobs for free workers, tenant by tenant in deficit round robin order.

    It only claims as many jobs as there are free workers, so a tenant that floods the queue
    cannot fill a local buffer ahead of others. It wakes at once when this process enqueues or
    a worker frees up, at the next ``run_at`` of a waiting job, and every ``poll_interval`` to
    see work that other processes enqueued.

    A job whose worker died while running it (a suspect) runs alone: the dispatcher lets the
    running jobs finish, runs the suspect by itself, and only then claims again, so a job that
    kills its process takes no innocent job with it. A suspect batch job runs alone only until
    it commits its first chunk.

    Jobs of callout tasks are claimed for the runner's callout pool, with deficit round robin
    turns of their own, as places free up there; the other jobs for the workers.

    With ``parallel_claims`` above one (a store whose claims run side by side on connections
    of their own), up to that many claims are in flight at once, each for a share of the free
    places: workers that free up while a claim is under way get a claim of their own at once,
    instead of waiting for it to return.
    """

    def __init__(
        self,
        *,
        store: Store,
        runner: Runner,
        owner: str,
        tasks: Collection[str],
        fairness: DeficitRoundRobin,
        monitor: LoadMonitor,
        worker_tasks: AbstractSet[str],
        callout_tasks: AbstractSet[str],
        callout_fairness: DeficitRoundRobin,
        clock: Callable[[], float],
        lease: float,
        poll_interval: float,
        parallel_claims: int = 1,
    ) -> None:
        self._store = store
        self._runner = runner
        self._owner = owner
        self._tasks = tasks
        self._fairness = fairness
        self._callout_tasks = callout_tasks
        self._pools = (
            _Pool(worker_tasks, fairness, callout=False),
            _Pool(callout_tasks, callout_fairness, callout=True),
        )
        self._monitor = monitor
        self._clock = clock
        self._lease = lease
        self._poll_interval = poll_interval
        self._wake = anyio.Event()
        self._next_run_at: float | None = None
        self._next_poll = 0.0
        self._stopped = False
        self._suspects = False
        self._isolating = False
        self._reserved: list[JobId] = []
        self._parallel_claims = parallel_claims
        self._claims = 0
        """Claims in flight in tasks of their own (with ``parallel_claims`` above one)."""
        self._claim_failure: Exception | None = None
        """Why the last claim in a task of its own failed, until the dispatch loop sees it."""
        self._group: anyio.abc.TaskGroup | None = None

    def notify(
        self,
        tenants: Iterable[str] = (),
        run_at: float | None = None,
        *,
        tasks: Collection[str] | None = None,
    ) -> None:
        """Tell the dispatcher about new ready work (tenants) or a job waiting until ``run_at``.

        ``tasks``, if known, are the tasks of the new work: only the pools that run one of
        them look for it.
        """
        if not self._callout_tasks:  # every job is the workers'
            self._fairness.add(tenants)
        else:
            tenants = list(tenants)
            for pool in self._pools:
                if pool.tasks and (tasks is None or not pool.tasks.isdisjoint(tasks)):
                    pool.fairness.add(tenants)
        if run_at is not None and (self._next_run_at is None or run_at < self._next_run_at):
            self._next_run_at = run_at
        self._wake.set()

    def poll_now(self) -> None:
        """Look at the store again at once (after a resume, say)."""
        self._next_poll = 0.0
        self._wake.set()

    def vouch(self) -> None:
        """A running batch job committed a chunk: if it is the suspect that runs alone, it did
        not kill its process this time, so the others may run beside it again."""
        if self._isolating:
            self._isolating = False
            self._suspects = False  # the next poll looks again
            self.poll_now()

    def run_reserved(self, job_ids: Iterable[JobId]) -> None:
        """Claim these jobs at once on the reserved workers, ahead of every tenant's turn and
        while the host is busy (the jobs of ``reserve=True`` schedules)."""
        self._reserved.extend(job_ids)
        self._wake.set()

    def claim_on_enqueue(
        self, tenants: Collection[str], tasks: Collection[str]
    ) -> ClaimRequest | None:
        """The claim to make in the transaction that enqueues ready jobs of ``tenants`` and
        ``tasks``, if the dispatcher is idle: it would make that claim next, a round trip later.

        None if anything comes first: known ready work, a poll or a job that is due, a suspect,
        overload, a callout task, no free worker. The caller must hand the outcome to
        :meth:`enqueue_claimed`, whatever happens.
        """
        pool = self._pools[0]
        now = self._clock()
        if (
            self._stopped
            or pool.fairness
            or self._claims
            or self._reserved
            or self._isolating
            or self._suspects
            or self._monitor.overloaded
            or now >= self._next_poll
            or (self._next_run_at is not None and self._next_run_at <= now)
            or not all(task in pool.tasks for task in tasks)
            or (free := self._free(pool)) <= 0
        ):
            return None
        pool.fairness.add(tenants)
        wanted = pool.fairness.allocate(free)
        pool.promised += sum(wanted.values())
        return ClaimRequest(self._owner, wanted, pool.tasks, now + self._lease)

    def enqueue_claimed(self, claim: ClaimRequest, jobs: list[ClaimedJob] | None) -> None:
        """Hand the jobs that a :meth:`claim_on_enqueue` claim got to the workers (None: it
        claimed nothing, the enqueue failed or the store left the claim to the dispatcher)."""
        self._pools[0].promised -= sum(claim.wanted.values())
        if jobs is not None:
            claimed_for = self._clock() - (claim.lease_until - self._lease)
            self._take(self._pools[0], claim.wanted, jobs, anyio.current_time() - claimed_for)
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more."""
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        """Claim and hand over jobs until stopped or cancelled; then wait for the claims still
        in flight to reach the workers."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                await self._run()
        finally:
            self._group = None
            with anyio.CancelScope(shield=True):
                while self._pools[0].promised:
                    self._wake = anyio.Event()
                    await self._wake.wait()

    async def _run(self) -> None:
        pause = 0.0
        while not self._stopped:
            await self._sleep()
            if self._stopped:
                return
            if self._reserved:
                try:
                    await self._claim_reserved()
                except Exception as exc:
                    log.error("claiming reserved jobs failed", error=repr(exc))
            if self._monitor.overloaded:
                with anyio.move_on_after(self._poll_interval):
                    await self._monitor.wait_until_clear()
                continue
            try:
                await self._dispatch()
                pause = 0.0
            except Exception as exc:
                pause = retry_pause(pause, self._poll_interval)
                log.error("dispatch failed, retrying", error=repr(exc), retry_in=pause)
                with anyio.move_on_after(pause):  # or sooner if woken (the LISTEN is back, say)
                    await self._wake.wait()

    async def _sleep(self) -> None:
        now = self._clock()
        deadline = self._next_poll
        if self._next_run_at is not None:
            deadline = min(deadline, self._next_run_at)
        wait = deadline - now
        blocked = (self._isolating or self._suspects) and self._busy
        if (
            not blocked
            and self._claims < self._parallel_claims
            and any(pool.fairness and self._free(pool) for pool in self._pools)
        ):
            wait = 0.0
        if wait > 0:
            with anyio.move_on_after(wait):
                await self._wake.wait()
        else:
            await anyio.lowlevel.checkpoint()
        self._wake = anyio.Event()

    @property
    def _busy(self) -> bool:
        """Whether jobs are held or claims are in flight: a suspect must wait."""
        return bool(self._runner.in_flight or self._claims)

    async def _dispatch(self) -> None:
        if self._claim_failure is not None:  # the loop pauses as after any failed dispatch
            failure, self._claim_failure = self._claim_failure, None
            raise failure
        now = self._clock()
        if now >= self._next_poll or (self._next_run_at is not None and self._next_run_at <= now):
            tenants, self._next_run_at = await self._store.promote(now)
            self.notify(tenants)
        if now >= self._next_poll:
            self._fairness.add(await self._store.admit(now))
            for pool in self._pools:
                if pool.tasks:
                    pool.fairness.add(await self._store.ready_tenants(pool.tasks))
            self._suspects = await self._store.has_suspects(self._tasks)
            self._next_poll = self._clock() + self._poll_interval
        if self._isolating or self._suspects:
            if self._busy:
                return
            self._isolating = False
            if self._suspects and await self._run_suspect():
                return
        for pool in self._pools:
            await self._claim_for(pool)

    def _free(self, pool: _Pool) -> int:
        places = self._runner.callout_free if pool.callout else self._runner.free_slots
        return max(places - pool.promised, 0)

    async def _claim_for(self, pool: _Pool) -> None:
        """Claim jobs of the pool's tasks for its free places, tenant by tenant: in this task,
        or in tasks of their own while fewer than ``parallel_claims`` are in flight."""
        # Overload may begin during the store calls above: no claim once it has.
        while (
            not self._stopped
            and pool.fairness
            and not self._monitor.overloaded
            and self._claims < self._parallel_claims
            and (free := self._free(pool)) > 0
        ):
            share = max(
                free // (self._parallel_claims - self._claims), min(free, SHARED_CLAIM_FLOOR)
            )
            wanted = pool.fairness.allocate(share)
            asked = sum(wanted.values())
            pool.promised += asked
            if self._parallel_claims == 1 or self._group is None:
                await self._claim(pool, wanted, asked)
            else:
                self._claims += 1
                self._group.start_soon(self._claim_aside, pool, wanted, asked)

    async def _claim(self, pool: _Pool, wanted: Mapping[str, int], asked: int) -> None:
        """Claim ``wanted`` jobs, whose ``asked`` places are promised, and hand them over (if
        the queue began to close meanwhile, the runner releases them as it drains)."""
        try:
            now, started = self._clock(), anyio.current_time()
            jobs = await self._store.claim(self._owner, wanted, pool.tasks, now, now + self._lease)
        finally:
            pool.promised -= asked
        self._take(pool, wanted, jobs, started)

    async def _claim_aside(self, pool: _Pool, wanted: Mapping[str, int], asked: int) -> None:
        try:
            await self._claim(pool, wanted, asked)
        except Exception as exc:
            self._claim_failure = exc
        finally:
            self._claims -= 1
            self._wake.set()

    def _take(
        self, pool: _Pool, wanted: Mapping[str, int], jobs: list[ClaimedJob], claimed_at: float
    ) -> None:
        """Hand claimed jobs to the pool; tenants that got fewer than wanted have no more."""
        got = collections.Counter(job.tenant for job in jobs)
        for tenant, count in wanted.items():
            if got[tenant] < count:
                pool.fairness.discard(tenant)
        jobs.sort(key=lambda job: job.order)
        self._runner.submit(jobs, claimed_at=claimed_at, callout=pool.callout)

    async def _claim_reserved(self) -> None:
        """Claim the jobs :meth:`run_reserved` names, as many as reserved workers are free.

        The others stay QUEUED for their turn. A suspect being isolated keeps them waiting too.
        """
        job_ids, self._reserved = self._reserved, []
        free = self._runner.reserved_free
        if not free or ((self._isolating or self._suspects) and self._runner.in_flight):
            return
        now, started = self._clock(), anyio.current_time()
        jobs = await self._store.claim_jobs(
            self._owner, job_ids[:free], self._tasks, now, now + self._lease
        )
        self._runner.submit(jobs, claimed_at=started)  # on the reserved workers, callout too

    def _is_callout(self, task: str) -> bool:
        return any(pool.callout and task in pool.tasks for pool in self._pools)

    async def _run_suspect(self) -> bool:
        """Claim a job whose worker died while running it, to run on its own."""
        now, started = self._clock(), anyio.current_time()
        job = await self._store.claim_suspect(self._owner, self._tasks, now, now + self._lease)
        if job is None:
            self._suspects = False
            return False
        log.warning("running a job whose previous worker died, alone", job_id=job.id,
                    tenant=job.tenant, task=job.task, attempt=job.attempt)  # fmt: skip
        self._isolating = True
        self._runner.submit([job], claimed_at=started, callout=self._is_callout(job.task))
        return True
