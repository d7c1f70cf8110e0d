"""Abort, pause and resume, as operators use them."""

from __future__ import annotations

import anyio
import pytest

import flexq
from tests.conftest import make_queue


async def test_abort_queued_job_never_runs(queue_url: str) -> None:
    """An aborted waiting job ends ABORTED and its handler never runs."""
    queue = make_queue(queue_url)
    ran = []

    @queue.task
    async def work() -> None:
        ran.append(1)

    await queue.open()
    job_id = await queue.enqueue(work)
    scheduled = await queue.enqueue(work, delay=0.1)
    assert await queue.abort(job_id) is flexq.State.ABORTED
    assert await queue.abort(scheduled) is flexq.State.ABORTED
    await queue.close()
    async with queue:
        info = await queue.wait(job_id, timeout=5)
        await anyio.sleep(0.3)
    assert info.state is flexq.State.ABORTED
    assert info.abort_requested
    assert ran == []


async def test_abort_running_job_cancels_it(queue_url: str) -> None:
    """Aborting a running job cancels its handler and it ends ABORTED, not retried."""
    queue = make_queue(queue_url)
    started = anyio.Event()
    cancelled = []

    @queue.task(retries=3)
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    async with queue:
        job_id = await queue.enqueue(endless)
        await started.wait()
        assert await queue.abort(job_id) is flexq.State.PROCESSING
        info = await queue.wait(job_id, timeout=5)
    assert (info.state, info.attempts, cancelled) == (flexq.State.ABORTED, 1, [True])
    assert queue.statistics().aborted == 1


async def test_abort_from_another_process_reaches_the_worker(sqlite_url: str) -> None:
    """A second queue on the same file aborts a job the first one runs (through lease renewal)."""
    worker = make_queue(sqlite_url, lease=0.3)
    operator = make_queue(sqlite_url)
    started = anyio.Event()

    @worker.task(name="endless")
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    @operator.task(name="endless")
    async def endless_elsewhere() -> None:
        pass

    async with worker:
        job_id = await worker.enqueue(endless)
        await started.wait()
        await operator.open()
        try:
            assert await operator.abort(job_id) is flexq.State.PROCESSING
            info = await operator.wait(job_id, timeout=5)
        finally:
            await operator.close()
    assert info.state is flexq.State.ABORTED


async def test_abort_final_or_unknown_job_raises(queue_url: str) -> None:
    """A final job cannot be aborted; an unknown id is JobNotFound."""
    queue = make_queue(queue_url)

    @queue.task
    async def quick() -> None:
        pass

    async with queue:
        job_id = await queue.enqueue(quick)
        await queue.wait(job_id, timeout=5)
        with pytest.raises(flexq.IllegalTransition):
            await queue.abort(job_id)
        with pytest.raises(flexq.JobNotFound):
            await queue.abort("missing")


async def test_pause_tenant_holds_its_jobs_while_others_run(queue_url: str) -> None:
    """A paused tenant's jobs wait (visible as paused); other tenants run; resume releases."""
    queue = make_queue(queue_url)

    @queue.task
    async def work() -> None:
        pass

    async with queue:
        assert await queue.pause(tenant="acme")
        assert not await queue.pause(tenant="acme")
        held = await queue.enqueue(work, tenant="acme")
        other = await queue.enqueue(work, tenant="globex")
        assert (await queue.wait(other, timeout=5)).state is flexq.State.COMPLETED
        await anyio.sleep(0.2)
        assert (await queue.get(held)).state is flexq.State.QUEUED
        assert [(p.scope, p.name) for p in await queue.paused()] == [
            (flexq.PauseScope.TENANT, "acme")
        ]
        assert await queue.resume(tenant="acme")
        assert (await queue.wait(held, timeout=5)).state is flexq.State.COMPLETED
        assert await queue.paused() == []


async def test_pause_task_and_whole_queue(queue_url: str) -> None:
    """Pausing a task holds only its jobs; pausing the queue holds everything."""
    queue = make_queue(queue_url)

    @queue.task
    async def a() -> None:
        pass

    @queue.task
    async def b() -> None:
        pass

    async with queue:
        await queue.pause(task=a)
        held = await queue.enqueue(a)
        assert (await queue.wait(await queue.enqueue(b), timeout=5)).is_final
        await queue.pause()
        also_held = await queue.enqueue(b)
        await anyio.sleep(0.2)
        assert (await queue.get(held)).state is flexq.State.QUEUED
        assert (await queue.get(also_held)).state is flexq.State.QUEUED
        await queue.resume()
        assert (await queue.wait(also_held, timeout=5)).is_final
        assert (await queue.get(held)).state is flexq.State.QUEUED
        await queue.resume(task=a)
        assert (await queue.wait(held, timeout=5)).is_final
        with pytest.raises(flexq.InvalidArguments):
            await queue.pause(tenant="x", task=a)


async def test_pause_is_persisted_for_later_queues(sqlite_url: str) -> None:
    """A pause outlives the process that set it."""
    queue = make_queue(sqlite_url)
    await queue.open()
    await queue.pause(tenant="acme")
    await queue.close()
    again = make_queue(sqlite_url)
    await again.open()
    try:
        assert [p.name for p in await again.paused()] == ["acme"]
    finally:
        await again.close()


async def test_running_jobs_go_on_when_paused(queue_url: str) -> None:
    """Pause stops claiming, not running: a started job completes."""
    queue = make_queue(queue_url)
    started, release = anyio.Event(), anyio.Event()

    @queue.task
    async def long() -> None:
        started.set()
        await release.wait()

    async with queue:
        job_id = await queue.enqueue(long)
        await started.wait()
        await queue.pause()
        release.set()
        assert (await queue.wait(job_id, timeout=5)).state is flexq.State.COMPLETED
