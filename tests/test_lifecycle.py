"""Starting and stopping the queue, however the host stops it, leaves no job stuck."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime

import anyio
import pytest

import flexq
from tests.conftest import make_queue


async def test_cancelling_the_host_block_releases_running_jobs(queue_url: str) -> None:
    """A cancel scope around `async with queue:` ends it promptly; the running job is requeued."""
    queue = make_queue(queue_url)
    started = anyio.Event()

    @queue.task
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    await queue.open()
    job_id = await queue.enqueue(endless)
    await queue.close()
    with anyio.fail_after(10):
        with anyio.CancelScope() as outer:
            async with queue:
                await started.wait()
                outer.cancel()
                await anyio.sleep_forever()
    await queue.open()
    try:
        info = await queue.get(job_id)
    finally:
        await queue.close()
    assert (info.state, info.attempts) == (flexq.State.QUEUED, 0)


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_handler_raising_cancelled_error_fails_only_its_job(queue_url: str) -> None:
    """An asyncio CancelledError from a handler's own await is that job's failure, nothing more."""
    queue = make_queue(queue_url)

    @queue.task
    async def awaits_a_cancelled_future() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    @queue.task
    async def fine() -> str:
        return "ok"

    async with queue:
        bad = await queue.wait(await queue.enqueue(awaits_a_cancelled_future), timeout=10)
        good = await queue.wait(await queue.enqueue(fine), timeout=10)
    assert bad.state is flexq.State.FAILED
    assert bad.error is not None
    assert bad.error.type == "asyncio.exceptions.CancelledError"
    assert good.result == "ok"


async def test_shutdown_is_not_held_up_by_a_busy_host(queue_url: str) -> None:
    """Leaving the block works while the load probe says the host is busy."""
    queue = make_queue(queue_url, load_probe=lambda: True)
    with anyio.fail_after(10):
        async with queue:
            await anyio.sleep(0.2)
            assert queue.statistics().throttled


async def test_a_handler_that_finishes_despite_an_abort_completes(queue_url: str) -> None:
    """If a handler shields itself from the abort and returns, its result stands."""
    queue = make_queue(queue_url)
    started = anyio.Event()

    @queue.task
    async def stubborn() -> str:
        started.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)
        return "done anyway"

    async with queue:
        job_id = await queue.enqueue(stubborn)
        await started.wait()
        await queue.abort(job_id)
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.result) == (flexq.State.COMPLETED, "done anyway")


async def test_non_json_result_is_not_retried(queue_url: str) -> None:
    """Another attempt cannot make a result JSON: the job fails at once."""
    queue = make_queue(queue_url)
    runs = []

    @queue.task(retries=3)
    async def returns_a_set() -> object:
        runs.append(1)
        return {1, 2}

    async with queue:
        info = await queue.wait(await queue.enqueue(returns_a_set), timeout=10)
    assert (info.state, info.attempts, len(runs)) == (flexq.State.FAILED, 1, 1)


async def test_far_future_and_unencodable_input_is_rejected(queue_url: str) -> None:
    """Dates past the year 9000 and strings UTF-8 cannot hold are refused at the call."""
    queue = make_queue(queue_url)

    @queue.task
    async def work(name: str) -> str:
        return name

    await queue.open()
    try:
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(work, "x", delay=1e12)
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(work, "x", run_at=datetime(9999, 1, 1, tzinfo=UTC))
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(work, "x", tenant="bad\udce9")
        surrogate = b"caf\xe9".decode(sys.getfilesystemencoding(), "surrogateescape")
        job_id = await queue.enqueue(work, surrogate)
        assert (await queue.get(job_id)).args == (surrogate,)
    finally:
        await queue.close()


async def test_waiting_leaves_no_waiters_behind(queue_url: str) -> None:
    """wait() on finished, timed-out and unknown jobs keeps no per-job state afterwards."""
    queue = make_queue(queue_url)

    @queue.task
    async def quick() -> None:
        pass

    async with queue:
        done = await queue.enqueue(quick)
        await queue.wait(done, timeout=10)
        await queue.wait(done, timeout=10)
        later = await queue.enqueue(quick, delay=60)
        with pytest.raises(flexq.WaitTimeout):
            await queue.wait(later, timeout=0.05)
        with pytest.raises(flexq.JobNotFound):
            await queue.wait("missing", timeout=1)
        assert queue._waiters == {}


async def test_close_inside_the_block_is_refused(queue_url: str) -> None:
    """close() while workers run raises instead of pulling the store from under them."""
    queue = make_queue(queue_url)
    async with queue:
        with pytest.raises(flexq.FlexqError):
            await queue.close()


async def test_worker_processes_are_listed_while_they_run(sqlite_url: str) -> None:
    """queue.workers() lists every queue running workers on the store, alive, until it stops."""
    first, second = make_queue(sqlite_url, workers=3), make_queue(sqlite_url, workers=2)
    async with first:
        async with second:
            listed = await first.workers()
        after_second = await first.workers()
    assert [(w.pid, w.workers, w.alive) for w in listed] == [(os.getpid(), 3, True),
                                                             (os.getpid(), 2, True)]  # fmt: skip
    assert listed[0].last_seen >= listed[0].started_at
    assert [w.workers for w in after_second] == [3]
    await first.open()
    try:
        assert await first.workers() == []
    finally:
        await first.close()
