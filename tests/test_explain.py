"""``queue.explain``: why a job is not running, one test per reason.

Every async test runs under asyncio and trio, on the memory and the SQLite store.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

import flexq
from flexq._explain import LocalFacts, explain
from flexq._store.base import WaitFacts
from flexq._store.memory import MemoryStore
from tests.conftest import make_queue

WAIT = 30
Why = flexq.Why


def register_noop_batch(queue: flexq.Queue) -> type:
    @queue.batch(name="noop")
    class Noop:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [1]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    return Noop


class Blocker:
    """A task that blocks in its worker until released."""

    def __init__(self, queue: flexq.Queue) -> None:
        self.running = anyio.Event()
        self.release = anyio.Event()

        @queue.task(name="block")
        async def block() -> None:
            self.running.set()
            await self.release.wait()

        self.task = block

    async def start(self, queue: flexq.Queue, tenant: str = "acme") -> str:
        job_id = await queue.enqueue(self.task, tenant=tenant)
        with anyio.fail_after(WAIT):
            await self.running.wait()
        return job_id


@pytest.fixture
def shared_url(queue_url: str) -> flexq.abc.Store | str:
    """What two queues of one test use to share one store."""
    return MemoryStore() if queue_url == "memory://" else queue_url


async def test_a_holding_job_gives_its_position_and_the_slots_in_use(queue_url: str) -> None:
    """A HOLDING job: its 1-based place in the tenant's holding queue and the full slots."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=2))
    noop = register_noop_batch(queue)
    await queue.open()
    try:
        ids = [await queue.enqueue(noop, tenant="acme") for _ in range(5)]
        await queue.flex.move_to_front(ids[4])
        explanation = await queue.explain(ids[3])
        first = await queue.explain(ids[4])
    finally:
        await queue.close()
    assert explanation.state is flexq.State.HOLDING
    assert explanation.whys == (Why.HOLDING, Why.SLOTS_FULL)
    assert (explanation.holding_position, explanation.tenant) == (3, "acme")
    assert (explanation.active_batches, explanation.max_active_batches) == (2, 2)
    assert "number 3 of 3 in the holding queue of tenant 'acme'" in explanation.reasons[0].message
    assert "2 of its 2 active batch slots" in explanation.reasons[1].message
    assert str(explanation).startswith(f"job {ids[3]} (HOLDING): it is number 3 of 3")
    assert first.holding_position == 1
    assert "number 1 of 3" in str(first)


async def test_a_delayed_job_is_not_due(queue_url: str) -> None:
    """A SCHEDULED job waits for its run_at, which the reason names."""
    queue = make_queue(queue_url)

    @queue.task
    async def later() -> None:
        pass

    async with queue:
        job_id = await queue.enqueue(later, delay=3600)
        explanation = await queue.explain(job_id)
        info = await queue.get(job_id)
    assert explanation.state is flexq.State.SCHEDULED
    assert explanation.whys == (Why.NOT_DUE,)
    assert info.run_at.isoformat() in explanation.reasons[0].message
    assert re.search(r"\(in 3(599|600)\.\d s\)", explanation.reasons[0].message)


@pytest.mark.parametrize("scope", ["queue", "tenant", "task"])
async def test_a_paused_queue_tenant_or_task_holds_a_ready_job(queue_url: str, scope: str) -> None:
    """A QUEUED job under a pause says which pause holds it, and not that it is next."""
    queue = make_queue(queue_url)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        if scope == "queue":
            await queue.pause()
        elif scope == "tenant":
            await queue.pause(tenant="acme")
            await queue.pause(tenant="someone-else")
        else:
            await queue.pause(task=work)
        job_id = await queue.enqueue(work, tenant="acme")
        explanation = await queue.explain(job_id)
        await queue.resume(
            **(
                {"tenant": "acme"}
                if scope == "tenant"
                else {"task": work}
                if scope == "task"
                else {}
            )
        )
        if scope == "tenant":
            await queue.resume(tenant="someone-else")
        info = await queue.wait(job_id, timeout=WAIT)
    expected = {"queue": Why.QUEUE_PAUSED, "tenant": Why.TENANT_PAUSED, "task": Why.TASK_PAUSED}
    assert explanation.state is flexq.State.QUEUED
    assert explanation.whys == (expected[scope],)
    assert "paused (since" in str(explanation)
    assert info.state is flexq.State.COMPLETED


async def test_a_paused_tenant_is_named_for_its_holding_jobs(queue_url: str) -> None:
    """A holding job of a paused tenant gives both its place and the pause."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    noop = register_noop_batch(queue)
    await queue.open()
    try:
        await queue.pause(tenant="acme")
        explanation = await queue.explain(await queue.enqueue(noop, tenant="acme"))
    finally:
        await queue.close()
    assert explanation.whys == (Why.HOLDING, Why.SLOTS_FULL, Why.TENANT_PAUSED)


async def test_a_throttled_dispatcher_is_named(queue_url: str) -> None:
    """While the load probe says the host is busy, a ready job waits: THROTTLED."""
    queue = make_queue(queue_url, load_probe=lambda: True)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        with anyio.fail_after(WAIT):
            while not queue.statistics().throttled:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.01)
        job_id = await queue.enqueue(work)
        explanation = await queue.explain(job_id)
        state = (await queue.get(job_id)).state
    assert state is flexq.State.QUEUED
    assert explanation.whys == (Why.THROTTLED,)
    assert "while the host is busy" in str(explanation)


async def test_busy_workers_are_named(queue_url: str) -> None:
    """With every worker busy, a ready job waits for one: WORKERS_BUSY."""
    queue = make_queue(queue_url, workers=1)
    blocker = Blocker(queue)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        await blocker.start(queue)
        explanation = await queue.explain(await queue.enqueue(work, tenant="acme"))
        blocker.release.set()
    assert explanation.state is flexq.State.QUEUED
    assert explanation.whys == (Why.WORKERS_BUSY,)
    assert "all 1 workers of this process are busy" in str(explanation)


async def test_ready_jobs_ahead_and_other_tenants_are_a_fair_share_wait(queue_url: str) -> None:
    """A ready job behind others of its tenant (and other tenants) waits for its fair share,
    with the number of jobs ahead of it."""
    queue = make_queue(queue_url, workers=1)
    blocker = Blocker(queue)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        await blocker.start(queue)
        ahead = [await queue.enqueue(work, tenant="acme") for _ in range(2)]
        urgent = await queue.enqueue(work, tenant="acme", priority=5)
        await queue.enqueue(work, tenant="zeta")
        await queue.enqueue(work, tenant="omega")
        last = await queue.enqueue(work, tenant="acme")
        explanation = await queue.explain(last)
        first = await queue.explain(urgent)
        blocker.release.set()
        for job_id in (*ahead, urgent, last):
            await queue.wait(job_id, timeout=WAIT)
    assert explanation.whys == (Why.WORKERS_BUSY, Why.FAIR_SHARE)
    assert explanation.ready_ahead == 3
    assert "3 ready jobs of tenant 'acme' run before it, and 2 other tenants" in str(explanation)
    assert first.ready_ahead == 0
    assert first.whys == (Why.WORKERS_BUSY, Why.FAIR_SHARE)


async def test_a_task_this_process_does_not_run_is_named(shared_url: flexq.abc.Store | str) -> None:
    """A queue without a handler for the job's task says another process must run it."""
    producer = make_queue(shared_url)
    other = make_queue(shared_url)

    @producer.task(name="only-there")
    async def only_there() -> None:
        pass

    @other.task(name="something-else")
    async def something_else() -> None:
        pass

    await producer.open()
    try:
        job_id = await producer.enqueue(only_there)
        async with other:
            explanation = await other.explain(job_id)
        here = await producer.explain(job_id)  # open without workers: it runs nothing either
    finally:
        await producer.close()
    assert explanation.whys == (Why.NOT_RUN_HERE,)
    assert "no handler for task 'only-there'" in str(explanation)
    assert here.whys == (Why.NOT_RUN_HERE,)
    assert "runs no workers" in str(here)


async def test_a_final_job_waits_for_nothing(queue_url: str) -> None:
    """Completed and aborted jobs are FINISHED."""
    queue = make_queue(queue_url)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        done = await queue.enqueue(work)
        await queue.wait(done, timeout=WAIT)
        aborted = await queue.enqueue(work, delay=60)
        await queue.abort(aborted)
        explanations = [await queue.explain(job_id) for job_id in (done, aborted)]
    assert [e.whys for e in explanations] == [(Why.FINISHED,), (Why.FINISHED,)]
    assert [e.state for e in explanations] == [flexq.State.COMPLETED, flexq.State.ABORTED]
    assert "it is COMPLETED: it waits for nothing" in str(explanations[0])


async def test_a_running_job_and_a_running_batch_are_running(queue_url: str) -> None:
    """A job in PROCESSING, and a batch in PREPARING, are RUNNING."""
    queue = make_queue(queue_url)
    blocker = Blocker(queue)
    in_start = anyio.Event()
    release = anyio.Event()

    @queue.batch
    class Slow:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            in_start.set()
            await release.wait()
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        job_id = await blocker.start(queue)
        batch_id = await queue.enqueue(Slow)
        with anyio.fail_after(WAIT):
            await in_start.wait()
        running = await queue.explain(job_id)
        preparing = await queue.explain(batch_id)
        blocker.release.set()
        release.set()
        await queue.wait(batch_id, timeout=WAIT)
    assert (running.state, running.whys) == (flexq.State.PROCESSING, (Why.RUNNING,))
    assert (preparing.state, preparing.whys) == (flexq.State.PREPARING, (Why.RUNNING,))
    assert preparing.active_batches == 1


async def test_explain_an_unknown_job(queue_url: str) -> None:
    """explain raises JobNotFound for an unknown id, QueueClosed on a closed queue."""
    queue = make_queue(queue_url)
    with pytest.raises(flexq.QueueClosed):
        await queue.explain("nope")
    async with queue:
        with pytest.raises(flexq.JobNotFound):
            await queue.explain("nope")


# -- the rules, on facts made by hand ---------------------------------------------------------


def _queued_facts(**changes: Any) -> WaitFacts:
    info = flexq.JobInfo(
        id="j", task="t", kind=flexq.Kind.QUEUEABLE, tenant="acme", priority=0,
        state=flexq.State.QUEUED, args=(), kwargs={}, attempts=0, max_attempts=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC), run_at=datetime(2026, 1, 1, tzinfo=UTC),
        started_at=None, finished_at=None, result=None, errors=(), parent_id=None, key=None,
        progress=None, abort_requested=False,
    )  # fmt: skip
    return dataclasses.replace(WaitFacts(info, None, 0, 0, 0, 0, ()), **changes)


LOCAL = LocalFacts(
    now=0.0, limits=flexq.Limits(), runs_task=True, has_workers=True, workers=4,
    busy_workers=0, throttled=False, loop_lag=0.0,
)  # fmt: skip


def test_a_ready_job_with_nothing_ahead_is_next() -> None:
    """A QUEUED job that nothing holds back is NEXT, and only that."""
    assert explain(_queued_facts(), LOCAL).whys == (Why.NEXT,)


def test_next_is_never_given_with_a_reason_that_holds_the_job() -> None:
    """NEXT ("a worker takes it at once") never comes with a pause, throttling or a missing
    handler: those hold the job back."""
    pause = flexq.Pause(flexq.PauseScope.QUEUE, "", datetime(2026, 1, 1, tzinfo=UTC))
    cases = [
        (_queued_facts(pauses=(pause,)), LOCAL),
        (_queued_facts(), dataclasses.replace(LOCAL, throttled=True)),
        (_queued_facts(), dataclasses.replace(LOCAL, runs_task=False)),
    ]
    for facts, local in cases:
        whys = explain(facts, local).whys
        assert whys
        assert Why.NEXT not in whys, whys


def test_a_requeued_job_whose_worker_died_is_a_suspect() -> None:
    """A QUEUED job whose last error is a lost lease runs alone: SUSPECT."""
    lost = flexq.JobError("flexq.LeaseExpired", "died", "", 1, datetime(2026, 1, 1, tzinfo=UTC))
    facts = _queued_facts()
    facts = _queued_facts(info=dataclasses.replace(facts.info, errors=(lost,)))
    assert Why.SUSPECT in explain(facts, LOCAL).whys


def test_a_running_job_with_an_abort_requested_is_aborting() -> None:
    """A running job whose abort was requested is ABORTING, not RUNNING."""
    facts = _queued_facts()
    info = dataclasses.replace(facts.info, state=flexq.State.PROCESSING, abort_requested=True)
    assert explain(_queued_facts(info=info), LOCAL).whys == (Why.ABORTING,)
