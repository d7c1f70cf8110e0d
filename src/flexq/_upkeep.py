"""Background upkeep: lease renewal, recovery of jobs whose worker died, and retention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import structlog

if TYPE_CHECKING:
    from collections.abc import Callable

    from flexq._models import JobId
    from flexq._store.base import Store, WorkerRecord

log = structlog.get_logger("flexq")

PRUNE_BATCH = 500


class Upkeep:
    """The loops that keep leases alive, rescue expired ones, and prune old jobs."""

    def __init__(
        self,
        *,
        store: Store,
        owner: str,
        clock: Callable[[], float],
        lease: float,
        max_lease_expiries: int,
        retention: float,
        prune_interval: float,
        held: Callable[[], list[JobId]],
        on_renewed: Callable[[list[JobId], float, list[JobId]], None],
        on_renewal_failed: Callable[[], None],
        on_abort_requested: Callable[[list[JobId]], None],
        on_recovered: Callable[[], None],
        worker: WorkerRecord,
    ) -> None:
        self._store = store
        self._owner = owner
        self._clock = clock
        self._lease = lease
        self._max_lease_expiries = max_lease_expiries
        self._retention = retention
        self._prune_interval = prune_interval
        self._held = held
        self._on_renewed = on_renewed
        self._on_renewal_failed = on_renewal_failed
        self._on_abort_requested = on_abort_requested
        self._on_recovered = on_recovered
        self._worker = worker
        self.pruned = 0

    async def maintain_forever(self) -> None:
        """Every third of a lease: extend this process's leases, then recover expired ones.

        Renewing first, in the same task, means that a process whose loop was blocked for a
        while extends its own leases before it looks for expired ones, so it never takes its
        own running jobs for dead. Renewals begin every third of a lease however long the
        calls take (unless one takes longer): slow calls do not push them towards the end of
        the lease, when the runner stops the jobs whose lease was not renewed.
        """
        began = anyio.current_time()
        while True:
            await anyio.sleep(max(began + self._lease / 3 - anyio.current_time(), 0.0))
            began = anyio.current_time()
            await self.renew()
            await self.recover()
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Record in the store that this worker process is alive."""
        try:
            await self._store.put_worker(self._worker._replace(last_seen=self._clock()))
        except Exception as exc:
            log.error("could not record this worker's heartbeat", error=repr(exc))

    async def renew(self) -> None:
        """Extend the leases of the jobs this process holds; pass on their abort requests and
        the jobs whose lease it lost."""
        held = self._held()
        if not held:
            return
        started = anyio.current_time()
        try:
            renewal = await self._store.renew(self._owner, held, self._clock() + self._lease)
        except Exception as exc:
            log.error("could not renew leases", error=repr(exc))
            self._on_renewal_failed()
            return
        self._on_renewed(held, started, renewal.lost)
        if renewal.aborted:
            self._on_abort_requested(renewal.aborted)

    async def recover(self) -> None:
        """One recovery pass."""
        try:
            recovered = await self._store.recover(self._clock(), self._max_lease_expiries)
        except Exception as exc:
            log.error("could not recover expired leases", error=repr(exc))
            return
        if recovered.requeued or recovered.failed or recovered.aborted:
            log.warning(
                "recovered jobs whose lease expired",
                requeued=recovered.requeued,
                failed=recovered.failed,
                aborted=recovered.aborted,
            )
            self._on_recovered()

    async def prune_forever(self) -> None:
        """Delete final jobs older than the retention period, in small batches."""
        while True:
            await self.prune()
            await anyio.sleep(self._prune_interval)

    async def prune(self) -> int:
        """Prune until nothing is left to prune; return how many jobs went.

        Worker processes not seen for the retention period (they died) are forgotten too.
        """
        try:
            await self._store.prune_workers(self._clock() - self._retention)
        except Exception as exc:
            log.error("could not prune dead workers", error=repr(exc))
        total = 0
        while True:
            try:
                count = await self._store.prune(self._clock() - self._retention, PRUNE_BATCH)
            except Exception as exc:
                log.error("could not prune finished jobs", error=repr(exc))
                return total
            total += count
            self.pruned += count
            if count < PRUNE_BATCH:
                return total
            await anyio.lowlevel.checkpoint()
