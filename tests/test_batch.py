"""Batch jobs: start streams items into chunks, execute runs per chunk, finish sums up.

Every test runs under asyncio and trio, on the memory and the SQLite store.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import flexq
from flexq._store.sqlite import SCHEMA_VERSION
from tests.conftest import make_queue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
    from pathlib import Path

WAIT = 30


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 (state in the store: no event to wait on)
            await anyio.sleep(0.01)


async def progress_of(queue: flexq.Queue, job_id: str) -> flexq.BatchProgress:
    progress = (await queue.get(job_id)).progress
    assert isinstance(progress, flexq.BatchProgress)
    return progress


# -- lifecycle ------------------------------------------------------------------------------


async def test_async_generator_items_are_cut_into_chunks_of_scope(queue_url: str) -> None:
    """1,001 items with scope 200 make 6 chunks (5 full, 1 of one item), each run once."""
    queue = make_queue(queue_url)
    chunks: list[tuple[int | None, list[int]]] = []
    summaries: list[flexq.BatchSummary] = []
    contexts: list[tuple[str, int | None]] = []

    @queue.batch(scope=200)
    class Count:
        async def start(self, ctx: flexq.BatchContext, n: int) -> AsyncIterator[int]:
            contexts.append(("start", ctx.chunk))
            for i in range(n):
                yield i

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            chunks.append((ctx.chunk, chunk))

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> Any:
            contexts.append(("finish", ctx.chunk))
            summaries.append(summary)
            return {"total": summary.total_items, "ok": summary.ok}

    async with queue:
        job_id = await queue.enqueue(Count, 1001, tenant="acme")
        info = await queue.wait(job_id, timeout=WAIT)
    assert info.state is flexq.State.COMPLETED, info.errors
    assert info.kind is flexq.Kind.BATCH
    assert info.result == {"total": 1001, "ok": True}
    assert [index for index, _ in chunks] == [0, 1, 2, 3, 4, 5]
    assert [len(items) for _, items in chunks] == [200, 200, 200, 200, 200, 1]
    assert [item for _, items in chunks for item in items] == list(range(1001))
    assert contexts == [("start", None), ("finish", None)]
    (summary,) = summaries
    assert summary == flexq.BatchSummary(
        job_id=job_id, total_items=1001, items_processed=1001, chunks_total=6,
        chunks_succeeded=6, chunks_failed=0, errors=(),
    )  # fmt: skip
    assert info.progress == flexq.BatchProgress(
        items_processed=1001, total_items=1001, errors=0, chunks_total=6, chunks_succeeded=6,
        chunks_failed=0,
    )  # fmt: skip
    assert info.attempts == 1


async def _items_list(n: int) -> list[int]:
    return list(range(n))


async def _items_generator(n: int) -> Iterable[int]:
    return (i for i in range(n))


async def _items_async_iterable(n: int) -> AsyncIterator[int]:
    async def produce() -> AsyncIterator[int]:
        for i in range(n):
            await anyio.lowlevel.checkpoint()
            yield i

    return produce()


@pytest.mark.parametrize(
    "produce",
    [
        pytest.param(_items_list, id="list"),
        pytest.param(_items_generator, id="sync-generator"),
        pytest.param(_items_async_iterable, id="async-iterable"),
    ],
)
async def test_start_may_return_an_iterable_instead_of_yielding(
    queue_url: str, produce: Callable[[int], Awaitable[Iterable[int] | AsyncIterator[int]]]
) -> None:
    """An ``async def start`` that returns a list, a sync or an async iterable works alike."""
    queue = make_queue(queue_url)
    seen: list[int] = []

    @queue.batch(scope=3)
    class Returns:
        async def start(
            self, ctx: flexq.BatchContext, n: int
        ) -> Iterable[int] | AsyncIterator[int]:
            return await produce(n)

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            assert len(chunk) <= 3
            seen.extend(chunk)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            return summary.chunks_total

    async with queue:
        info = await queue.wait(await queue.enqueue(Returns, 10), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED, info.errors
    assert seen == list(range(10))
    assert info.result == 4


async def test_start_with_no_items_still_finishes(queue_url: str) -> None:
    """A start that yields nothing leads straight to finish with an empty summary."""
    queue = make_queue(queue_url)
    summaries: list[flexq.BatchSummary] = []

    @queue.batch
    class Empty:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            raise AssertionError("no chunk to execute")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            summaries.append(summary)

    async with queue:
        info = await queue.wait(await queue.enqueue(Empty), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert info.result is None
    ((summary),) = summaries
    assert (summary.total_items, summary.chunks_total, summary.ok) == (0, 0, True)


async def test_progress_is_visible_while_the_batch_runs(queue_url: str) -> None:
    """While a later chunk runs, JobInfo.progress shows the totals and the chunks already done."""
    queue = make_queue(queue_url)
    in_start: list[flexq.JobInfo] = []
    reached_third = anyio.Event()
    go_on = anyio.Event()

    @queue.batch(scope=10)
    class Slow:
        async def start(self, ctx: flexq.BatchContext) -> AsyncIterator[int]:
            in_start.append(await queue.get(ctx.job_id))
            for i in range(50):
                yield i

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if ctx.chunk == 2:
                reached_third.set()
                await go_on.wait()

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        job_id = await queue.enqueue(Slow)
        with anyio.fail_after(WAIT):
            await reached_third.wait()

        async def two_chunks_done() -> bool:
            return (await progress_of(queue, job_id)).items_processed == 20

        # The first two chunks ended: their checkpoint is written while the third still runs.
        await until(two_chunks_done)
        info = await queue.get(job_id)
        go_on.set()
        final = await queue.wait(job_id, timeout=WAIT)
    (preparing,) = in_start
    assert preparing.state is flexq.State.PREPARING
    assert preparing.progress == flexq.BatchProgress(0, 0, 0, 0, 0, 0)
    assert info.state is flexq.State.PROCESSING
    assert info.progress == flexq.BatchProgress(
        items_processed=20, total_items=50, errors=0, chunks_total=5, chunks_succeeded=2,
        chunks_failed=0,
    )  # fmt: skip
    assert final.state is flexq.State.COMPLETED
    assert final.progress == flexq.BatchProgress(50, 50, 0, 5, 5, 0)


async def test_a_failing_chunk_is_retried_then_counted_failed_and_the_batch_goes_on(
    queue_url: str,
) -> None:
    """A chunk that raises every try is tried 1 + retries times, then counted failed with its
    error; a chunk that fails once succeeds on retry; finish runs and the batch COMPLETES."""
    queue = make_queue(queue_url)
    tries: dict[int, int] = {}
    summaries: list[flexq.BatchSummary] = []

    @queue.batch(scope=2, retries=2)
    class Flaky:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(8))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            assert ctx.chunk is not None
            tries[ctx.chunk] = tries.get(ctx.chunk, 0) + 1
            if ctx.chunk == 1:
                raise ValueError(f"bad chunk {chunk}")
            if ctx.chunk == 2 and tries[2] == 1:
                raise RuntimeError("transient")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> str:
            summaries.append(summary)
            return "done"

    async with queue:
        job_id = await queue.enqueue(Flaky)
        info = await queue.wait(job_id, timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert info.result == "done"
    assert info.errors == ()
    assert tries == {0: 1, 1: 3, 2: 2, 3: 1}
    (summary,) = summaries
    assert (summary.total_items, summary.items_processed) == (8, 8)
    assert (summary.chunks_total, summary.chunks_succeeded, summary.chunks_failed) == (4, 3, 1)
    assert not summary.ok
    (error,) = summary.errors
    assert isinstance(error, flexq.ChunkError)
    assert (error.chunk, error.type, error.message, error.tries) == (
        1, "builtins.ValueError", "bad chunk [2, 3]", 3,
    )  # fmt: skip
    assert "ValueError: bad chunk [2, 3]" in error.traceback
    assert isinstance(error.at, datetime)
    assert error.at.tzinfo is not None
    assert info.progress == flexq.BatchProgress(
        items_processed=8, total_items=8, errors=1, chunks_total=4, chunks_succeeded=3,
        chunks_failed=1,
    )  # fmt: skip


async def test_finish_raising_fails_the_batch(queue_url: str) -> None:
    """An exception from finish ends the batch FAILED at once, with finish's error."""
    queue = make_queue(queue_url)
    finishes = 0

    @queue.batch(retries=3)
    class BadFinish:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [1, 2, 3]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            nonlocal finishes
            finishes += 1
            raise KeyError("report missing")

    async with queue:
        info = await queue.wait(await queue.enqueue(BadFinish), timeout=WAIT)
    assert info.state is flexq.State.FAILED
    assert finishes == 1
    assert info.attempts == 1
    assert info.error is not None
    assert info.error.type == "builtins.KeyError"
    assert "report missing" in info.error.message
    assert info.progress == flexq.BatchProgress(3, 3, 0, 1, 1, 0)


async def test_start_raising_is_retried_as_an_attempt_then_fails(queue_url: str) -> None:
    """A start that raises is another attempt of the job (retries), then the batch FAILS."""
    queue = make_queue(queue_url)
    starts = 0

    @queue.batch(retries=1)
    class BadStart:
        async def start(self, ctx: flexq.BatchContext) -> AsyncIterator[int]:
            nonlocal starts
            starts += 1
            yield 1
            raise ConnectionError("source down")

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            raise AssertionError("no chunk runs: start never committed")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            raise AssertionError("finish does not run")

    async with queue:
        info = await queue.wait(await queue.enqueue(BadStart), timeout=WAIT)
    assert info.state is flexq.State.FAILED
    assert starts == 2
    assert info.attempts == 2
    assert [(e.type, e.message, e.attempt) for e in info.errors] == [
        ("builtins.ConnectionError", "source down", 1),
        ("builtins.ConnectionError", "source down", 2),
    ]
    assert info.progress == flexq.BatchProgress(0, 0, 0, 0, 0, 0)


async def test_a_retried_start_does_not_keep_the_chunks_of_the_failed_attempt(
    queue_url: str,
) -> None:
    """Chunks written by a start that then raised are dropped: each item runs once."""
    queue = make_queue(queue_url)
    starts = 0
    seen: list[int] = []

    @queue.batch(scope=1, retries=1)
    class Retried:
        async def start(self, ctx: flexq.BatchContext) -> AsyncIterator[int]:
            nonlocal starts
            starts += 1
            for i in range(120):  # more than FLUSH_CHUNKS chunks: some reach the store
                yield i
            if starts == 1:
                raise RuntimeError("lost the cursor")

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            seen.extend(chunk)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            return summary.chunks_total

    async with queue:
        info = await queue.wait(await queue.enqueue(Retried), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED, info.errors
    assert starts == 2
    assert seen == list(range(120))
    assert info.result == 120
    assert info.progress == flexq.BatchProgress(120, 120, 0, 120, 120, 0)


async def test_an_item_that_is_not_json_fails_the_batch_with_a_clear_error(
    queue_url: str,
) -> None:
    """start yielding a value JSON cannot hold fails the batch at once (no retry)."""
    queue = make_queue(queue_url)

    @queue.batch(retries=2)
    class NotJson:
        async def start(self, ctx: flexq.BatchContext) -> AsyncIterator[object]:
            yield 1
            yield {1, 2}

        async def execute(self, ctx: flexq.BatchContext, chunk: list[object]) -> None:
            raise AssertionError("no chunk runs")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            raise AssertionError("finish does not run")

    async with queue:
        info = await queue.wait(await queue.enqueue(NotJson), timeout=WAIT)
    assert info.state is flexq.State.FAILED
    assert info.attempts == 1
    assert info.error is not None
    assert info.error.type == "flexq.InvalidArguments"
    assert "batch items must be JSON values" in info.error.message


async def test_chunks_run_concurrently_up_to_the_concurrency_setting(queue_url: str) -> None:
    """With concurrency=3, three chunks run at once and never more."""
    queue = make_queue(queue_url)
    running = peak = 0
    three_at_once = anyio.Event()
    done: list[int] = []

    @queue.batch(scope=1, concurrency=3)
    class Parallel:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(12))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                if running == 3:
                    three_at_once.set()
                with anyio.fail_after(WAIT):
                    await three_at_once.wait()
                await anyio.sleep(0.005)
            finally:
                running -= 1
            done.extend(chunk)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            return summary.chunks_succeeded

    async with queue:
        info = await queue.wait(await queue.enqueue(Parallel), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED, info.errors
    assert info.result == 12
    assert peak == 3
    assert sorted(done) == list(range(12))


async def test_concurrency_one_runs_chunks_one_after_another(queue_url: str) -> None:
    """The default concurrency runs one chunk at a time, in chunk order."""
    queue = make_queue(queue_url)
    running = peak = 0
    order: list[int | None] = []

    @queue.batch(scope=1)
    class Serial:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(6))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            order.append(ctx.chunk)
            await anyio.sleep(0.001)
            running -= 1

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        info = await queue.wait(await queue.enqueue(Serial), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert (peak, order) == (1, [0, 1, 2, 3, 4, 5])


async def test_an_execute_over_its_timeout_counts_as_a_failed_try(queue_url: str) -> None:
    """``timeout`` bounds each execute call: a chunk stuck past it fails (TimeoutError)."""
    queue = make_queue(queue_url)
    tries: dict[int, int] = {}

    @queue.batch(scope=1, retries=1, timeout=0.2)
    class Stuck:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [0, 1, 2]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            assert ctx.chunk is not None
            tries[ctx.chunk] = tries.get(ctx.chunk, 0) + 1
            if ctx.chunk == 1:
                await anyio.sleep_forever()

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> Any:
            return [(e.chunk, e.type, e.tries) for e in summary.errors]

    async with queue:
        info = await queue.wait(await queue.enqueue(Stuck), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert tries == {0: 1, 1: 2, 2: 1}
    assert info.result == [[1, "builtins.TimeoutError", 2]]


async def test_finish_may_chain_the_next_batch(queue_url: str) -> None:
    """finish enqueues the next batch through its context: it waits for the slot, then runs."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    ran: list[str] = []
    child_state: list[flexq.State] = []

    @queue.batch
    class Second:
        async def start(self, ctx: flexq.BatchContext, label: str) -> list[str]:
            ran.append(f"start {label}")
            return [label]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[str]) -> None:
            ran.append(f"execute {chunk[0]}")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            ran.append("finish second")

    @queue.batch
    class First:
        async def start(self, ctx: flexq.BatchContext) -> list[str]:
            ran.append("start first")
            return ["a"]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[str]) -> None:
            ran.append("execute first")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> str:
            child = await ctx.enqueue(Second, "b")
            # The one active slot is still this batch's: the next one waits in the holding queue.
            child_state.append((await queue.get(child)).state)
            ran.append("finish first")
            return child

    async with queue:
        first = await queue.wait(await queue.enqueue(First, tenant="acme"), timeout=WAIT)
        assert first.state is flexq.State.COMPLETED
        second = await queue.wait(first.result, timeout=WAIT)
    assert second.state is flexq.State.COMPLETED
    assert (second.parent_id, second.tenant, second.kind) == (first.id, "acme", flexq.Kind.BATCH)
    assert child_state == [flexq.State.HOLDING]
    assert ran == [
        "start first", "execute first", "finish first", "start b", "execute b", "finish second",
    ]  # fmt: skip


async def test_batch_jobs_take_no_delay_or_run_at(queue_url: str) -> None:
    """A batch job waits for a slot, not a time: delay and run_at are refused, nothing written."""
    queue = make_queue(queue_url)

    @queue.batch
    class Plain:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        with pytest.raises(flexq.InvalidArguments, match="cannot be delayed"):
            await queue.enqueue(Plain, delay=5)
        with pytest.raises(flexq.InvalidArguments, match="cannot be delayed"):
            await queue.enqueue(Plain, run_at=datetime.now().astimezone())
        with pytest.raises(flexq.InvalidArguments, match="cannot be delayed"):
            await queue.enqueue_many([flexq.Call(Plain)], delay=1)
        assert sum((await queue.counts()).values()) == 0


def test_batch_classes_are_validated_when_registered() -> None:
    """A class without the three async methods, or a bad scope, is refused at registration."""
    queue = flexq.Queue("memory://")

    class NoExecute:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return []

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    class SyncFinish:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    with pytest.raises(flexq.InvalidArguments, match="no execute"):
        queue.batch(NoExecute)
    with pytest.raises(flexq.InvalidArguments, match="async def"):
        queue.batch(SyncFinish)

    class Valid(NoExecute):
        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

    for scope in (0, -1, True):
        with pytest.raises(flexq.InvalidArguments, match="scope"):
            queue.batch(scope=scope)(Valid)
    with pytest.raises(flexq.InvalidArguments, match="concurrency"):
        queue.batch(concurrency=0)(Valid)
    assert queue.tasks == {}


# -- abort in each state --------------------------------------------------------------------


def _recorder_batch(
    queue: flexq.Queue,
    log: list[str],
    *,
    block_start: anyio.Event | None = None,
    block_chunk: int | None = None,
    started: anyio.Event | None = None,
    scope: int = 5,
) -> type:
    """A batch of 20 items that logs what runs; it can block in start or in one chunk."""

    @queue.batch(scope=scope, name=f"recorder-{len(queue.tasks)}")
    class Recorder:
        async def start(self, ctx: flexq.BatchContext, label: str) -> AsyncIterator[int]:
            log.append(f"start {label}")
            for i in range(20):
                yield i
                if block_start is not None and i == 7:
                    if started is not None:
                        started.set()
                    await block_start.wait()

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            log.append(f"execute {ctx.chunk}")
            if ctx.chunk == block_chunk:
                if started is not None:
                    started.set()
                await anyio.sleep_forever()

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            (label,) = (await queue.get(ctx.job_id)).args
            log.append(f"finish {label}")

    return Recorder


async def test_abort_a_holding_batch(queue_url: str) -> None:
    """A HOLDING batch aborts at once, leaves the holding queue and never starts."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    log: list[str] = []
    recorder = _recorder_batch(queue, log)
    async with queue:
        first = await queue.enqueue(recorder, "first")
        second = await queue.enqueue(recorder, "second")
        assert await queue.abort(first) is flexq.State.ABORTED
        assert await queue.flex.order("default") == [second]
        info = await queue.wait(first, timeout=WAIT)
        usage = await queue.limits("default")
    assert info.state is flexq.State.ABORTED
    assert info.abort_requested
    assert info.progress == flexq.BatchProgress(0, 0, 0, 0, 0, 0)
    assert (usage.holding, usage.active_batches) == (1, 0)
    assert log == []


async def test_abort_a_queued_batch_admits_the_next_holding_one(queue_url: str) -> None:
    """Aborting an admitted (QUEUED) batch frees its slot: the first HOLDING job is admitted."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    log: list[str] = []
    recorder = _recorder_batch(queue, log)
    await queue.open()  # no workers: an admitted job stays QUEUED
    try:
        first = await queue.enqueue(recorder, "first")
        second = await queue.enqueue(recorder, "second")
        third = await queue.enqueue(recorder, "third")
        assert (await queue.get(first)).state is flexq.State.QUEUED
        assert (await queue.get(second)).state is flexq.State.HOLDING
        assert await queue.abort(first) is flexq.State.ABORTED
        assert (await queue.get(first)).state is flexq.State.ABORTED
        assert (await queue.get(second)).state is flexq.State.QUEUED
        assert await queue.flex.order("default") == [third]
        usage = await queue.limits("default")
        assert (usage.holding, usage.active_batches) == (1, 1)
    finally:
        await queue.close()
    assert log == []


async def test_abort_a_preparing_batch(queue_url: str) -> None:
    """Aborting while start runs cancels it: ABORTED, no chunk, no finish; the slot frees."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    log: list[str] = []
    started = anyio.Event()
    blocked = _recorder_batch(queue, log, block_start=anyio.Event(), started=started)
    plain = _recorder_batch(queue, log)
    async with queue:
        job_id = await queue.enqueue(blocked, "blocked")
        next_id = await queue.enqueue(plain, "next")
        with anyio.fail_after(WAIT):
            await started.wait()
        assert (await queue.get(job_id)).state is flexq.State.PREPARING
        assert (await queue.get(next_id)).state is flexq.State.HOLDING
        assert await queue.abort(job_id) is flexq.State.PREPARING
        info = await queue.wait(job_id, timeout=WAIT)
        following = await queue.wait(next_id, timeout=WAIT)
    assert info.state is flexq.State.ABORTED
    assert info.progress == flexq.BatchProgress(0, 0, 0, 0, 0, 0)
    assert following.state is flexq.State.COMPLETED
    assert log[0] == "start blocked"
    assert "finish blocked" not in log
    assert not any(entry.startswith("execute") for entry in log[: log.index("start next")])
    assert log[-1] == "finish next"


async def test_abort_a_processing_batch(queue_url: str) -> None:
    """Aborting while a chunk runs cancels it: ABORTED, no finish, the counts stay as they
    were, and the freed slot admits the next holding batch."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    log: list[str] = []
    started = anyio.Event()
    blocked = _recorder_batch(queue, log, block_chunk=2, started=started)
    plain = _recorder_batch(queue, log)
    async with queue:
        job_id = await queue.enqueue(blocked, "blocked")
        next_id = await queue.enqueue(plain, "next")
        with anyio.fail_after(WAIT):
            await started.wait()

        async def two_chunks_done() -> bool:
            return (await progress_of(queue, job_id)).chunks_succeeded == 2

        await until(two_chunks_done)
        before = await queue.get(job_id)
        assert before.state is flexq.State.PROCESSING
        assert await queue.abort(job_id) is flexq.State.PROCESSING
        info = await queue.wait(job_id, timeout=WAIT)
        following = await queue.wait(next_id, timeout=WAIT)
        after = await queue.get(job_id)
    assert info.state is flexq.State.ABORTED
    assert before.progress == flexq.BatchProgress(10, 20, 0, 4, 2, 0)
    assert info.progress == before.progress
    assert after.progress == before.progress
    assert following.state is flexq.State.COMPLETED
    assert "finish blocked" not in log
    assert log[:4] == ["start blocked", "execute 0", "execute 1", "execute 2"]
    assert log[4] == "start next"
    assert log[-1] == "finish next"


async def test_a_final_batch_cannot_be_aborted(queue_url: str) -> None:
    """Aborting a batch that ended raises IllegalTransition and changes nothing."""
    queue = make_queue(queue_url)
    log: list[str] = []
    recorder = _recorder_batch(queue, log)
    async with queue:
        job_id = await queue.enqueue(recorder, "done")
        info = await queue.wait(job_id, timeout=WAIT)
        with pytest.raises(flexq.IllegalTransition):
            await queue.abort(job_id)
        assert await queue.get(job_id) == info
    assert info.state is flexq.State.COMPLETED


# -- max_children_per_run -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "allowed"), [(None, 50), (flexq.Limits(max_children_per_run=3), 3)]
)
async def test_a_run_may_enqueue_at_most_max_children_per_run(
    queue_url: str, limits: flexq.Limits | None, allowed: int
) -> None:
    """The child past max_children_per_run raises LimitExceeded inside the handler."""
    tenant_limits = {} if limits is None else {"small": limits}
    queue = make_queue(queue_url, tenant_limits=tenant_limits)
    tenant = "default" if limits is None else "small"
    outcome: list[object] = []

    @queue.task(kind="future")
    async def child(n: int) -> None:
        pass

    @queue.task
    async def parent(ctx: flexq.Context) -> int:
        for n in range(allowed):
            await ctx.enqueue(child, n)
        try:
            await ctx.enqueue(child, allowed)
        except flexq.LimitExceeded as exc:
            outcome.append(exc)
        return ctx.children_enqueued

    async with queue:
        info = await queue.wait(await queue.enqueue(parent, tenant=tenant), timeout=WAIT)
        children = await queue.jobs(task=child, limit=1000)
    assert info.state is flexq.State.COMPLETED
    assert info.result == allowed
    (error,) = outcome
    assert isinstance(error, flexq.LimitExceeded)
    assert f"at most {allowed} jobs" in str(error)
    assert len(children.items) == allowed
    assert {c.parent_id for c in children.items} == {info.id}


async def test_each_batch_call_has_its_own_children_budget(queue_url: str) -> None:
    """In a batch, each execute (and start, finish) call may enqueue max_children_per_run."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_children_per_run=2))
    refused: list[int | None] = []

    @queue.task(kind="future")
    async def child() -> None:
        pass

    @queue.batch(scope=1)
    class Fans:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [0, 1, 2]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            await ctx.enqueue(child)
            await ctx.enqueue(child)
            with pytest.raises(flexq.LimitExceeded):
                await ctx.enqueue(child)
            refused.append(ctx.chunk)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            return summary.chunks_succeeded

    async with queue:
        info = await queue.wait(await queue.enqueue(Fans), timeout=WAIT)
        children = await queue.jobs(task=child, limit=100)
    assert (info.state, info.result) == (flexq.State.COMPLETED, 3)
    assert refused == [0, 1, 2]
    assert len(children.items) == 6


# -- SQLite schema migration ----------------------------------------------------------------

_V1_SCHEMA = """
CREATE TABLE flexq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE flexq_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    kind_rank INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    args TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    timeout REAL,
    created_at REAL NOT NULL,
    run_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    errors TEXT,
    progress TEXT,
    parent_id TEXT,
    key TEXT,
    lease_owner TEXT,
    lease_until REAL,
    lease_expiries INTEGER NOT NULL DEFAULT 0,
    abort_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX flexq_jobs_ready
    ON flexq_jobs (tenant, task, priority DESC, kind_rank, seq)
    WHERE state = 'QUEUED' AND lease_expiries = 0;
CREATE INDEX flexq_jobs_ready_tasks
    ON flexq_jobs (task, tenant) WHERE state = 'QUEUED' AND lease_expiries = 0;
CREATE INDEX flexq_jobs_suspects
    ON flexq_jobs (seq) WHERE state = 'QUEUED' AND lease_expiries > 0;
CREATE INDEX flexq_jobs_scheduled
    ON flexq_jobs (run_at) WHERE state = 'SCHEDULED';
CREATE INDEX flexq_jobs_leases
    ON flexq_jobs (lease_until) WHERE state IN ('PREPARING','PROCESSING');
CREATE INDEX flexq_jobs_finished
    ON flexq_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX flexq_jobs_key
    ON flexq_jobs (tenant, key) WHERE key IS NOT NULL
    AND state NOT IN ('ABORTED','COMPLETED','FAILED');
CREATE INDEX flexq_jobs_tenant ON flexq_jobs (tenant, seq);
CREATE INDEX flexq_jobs_state ON flexq_jobs (state, seq);
CREATE INDEX flexq_jobs_parent ON flexq_jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE flexq_pauses (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (scope, name)
);
INSERT INTO flexq_meta (key, value) VALUES ('schema_version', '1');
INSERT INTO flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, created_at, run_at)
    VALUES ('old-job', 'greet', 'queueable', 1, 'acme', 0, 'QUEUED', '["v1"]', '{}', 1,
    1700000000.0, 1700000000.0);
"""


async def test_a_schema_version_1_database_is_migrated_and_works(tmp_path: Path) -> None:
    """A file written by flexq's schema v1 (no holding positions) opens, migrates to v2, runs
    its old jobs and takes batch jobs."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()

    queue = make_queue(f"sqlite:///{path}", limits=flexq.Limits(max_active_batches=1))
    seen: list[int] = []

    @queue.task(name="greet")
    async def greet(name: str) -> str:
        return f"hi {name}"

    @queue.batch(scope=2)
    class Sum:
        async def start(self, ctx: flexq.BatchContext, n: int) -> list[int]:
            return list(range(n))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            seen.extend(chunk)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
            return summary.total_items

    async with queue:
        old = await queue.wait("old-job", timeout=WAIT)
        await queue.pause()
        jobs = [await queue.enqueue(Sum, n, tenant="acme") for n in (3, 4, 5)]
        assert await queue.flex.order("acme") == jobs[1:]
        assert await queue.flex.move_to_front(jobs[2])
        assert await queue.flex.order("acme") == [jobs[2], jobs[1]]
        await queue.resume()
        results = [(await queue.wait(job_id, timeout=WAIT)).result for job_id in jobs]
    assert (old.state, old.result) == (flexq.State.COMPLETED, "hi v1")
    assert results == [3, 4, 5]
    assert seen == [*range(3), *range(5), *range(4)]  # the reordered one went first
    db = sqlite3.connect(path)
    try:
        (version,) = db.execute(
            "SELECT value FROM flexq_meta WHERE key = 'schema_version'"
        ).fetchone()
        columns = {row[1] for row in db.execute("PRAGMA table_info(flexq_jobs)")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    assert version == str(SCHEMA_VERSION)
    assert {"position", "callouts"} <= columns
    assert {"flexq_batches", "flexq_chunks", "flexq_jobs_holding"} <= tables


async def test_abort_a_batch_waiting_to_retry_its_start(queue_url: str) -> None:
    """A batch whose start failed waits SCHEDULED for its retry, holding its slot; aborting it
    frees the slot for the next holding batch."""
    queue = make_queue(
        queue_url,
        limits=flexq.Limits(max_active_batches=1),
        backoff=flexq.Backoff(base=3600, jitter=0.0),
    )
    log: list[str] = []

    @queue.batch(retries=1)
    class Failing:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            log.append("failing start")
            raise RuntimeError("not yet")

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    plain = _recorder_batch(queue, log)
    async with queue:
        failing = await queue.enqueue(Failing)
        next_id = await queue.enqueue(plain, "next")

        async def scheduled() -> bool:
            return (await queue.get(failing)).state is flexq.State.SCHEDULED

        await until(scheduled)
        assert (await queue.get(next_id)).state is flexq.State.HOLDING
        usage = await queue.limits("default")
        assert await queue.abort(failing) is flexq.State.ABORTED
        following = await queue.wait(next_id, timeout=WAIT)
    assert (usage.holding, usage.active_batches) == (1, 1)
    assert following.state is flexq.State.COMPLETED
    assert log[0] == "failing start"
    assert log.count("failing start") == 1


async def test_abort_a_batch_running_chunks_concurrently(queue_url: str) -> None:
    """Aborting a batch cancels every chunk it runs at once; finish does not run."""
    queue = make_queue(queue_url)
    running = 0
    three = anyio.Event()
    cancelled: list[int | None] = []
    finished: list[bool] = []

    @queue.batch(scope=1, concurrency=3)
    class Wide:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(9))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            nonlocal running
            running += 1
            if running == 3:
                three.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(ctx.chunk)
                raise

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            finished.append(True)

    async with queue:
        job_id = await queue.enqueue(Wide)
        with anyio.fail_after(WAIT):
            await three.wait()
        await queue.abort(job_id)
        info = await queue.wait(job_id, timeout=WAIT)
    assert info.state is flexq.State.ABORTED
    assert sorted(cancelled, key=str) == [0, 1, 2]
    assert finished == []
    assert info.progress == flexq.BatchProgress(0, 9, 0, 9, 0, 0)


async def test_a_finish_result_that_is_not_json_fails_the_batch(queue_url: str) -> None:
    """finish returning a value JSON cannot hold fails the batch (no retry)."""
    queue = make_queue(queue_url)

    @queue.batch(retries=2)
    class BadResult:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [1]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> object:
            return object()

    async with queue:
        info = await queue.wait(await queue.enqueue(BadResult), timeout=WAIT)
    assert (info.state, info.attempts) == (flexq.State.FAILED, 1)
    assert info.error is not None
    assert "finish() return value must be JSON values" in info.error.message


async def test_a_chunk_too_large_to_store_fails_the_batch(
    queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose JSON passes MAX_CHUNK_BYTES fails the batch with advice on the scope."""
    monkeypatch.setattr("flexq._batch.MAX_CHUNK_BYTES", 64)
    queue = make_queue(queue_url)

    @queue.batch(scope=10)
    class Big:
        async def start(self, ctx: flexq.BatchContext) -> list[str]:
            return ["x" * 10] * 10

        async def execute(self, ctx: flexq.BatchContext, chunk: list[str]) -> None:
            raise AssertionError("no chunk runs")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            raise AssertionError("finish does not run")

    async with queue:
        info = await queue.wait(await queue.enqueue(Big), timeout=WAIT)
    assert info.state is flexq.State.FAILED
    assert info.error is not None
    assert "use a smaller scope or smaller items" in info.error.message


async def test_a_batch_context_keeps_no_free_form_progress(queue_url: str) -> None:
    """ctx.set_progress is refused in a batch: its progress is its chunk counts."""
    queue = make_queue(queue_url)
    refused: list[str] = []

    @queue.batch
    class Tries:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            with pytest.raises(flexq.InvalidArguments) as caught:
                await ctx.set_progress({"pct": 5})
            refused.append(str(caught.value))
            return [1]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        info = await queue.wait(await queue.enqueue(Tries), timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert refused == ["a batch job's progress is counted by its chunks"]
    assert info.progress == flexq.BatchProgress(1, 1, 0, 1, 1, 0)


async def test_a_keyed_batch_in_a_full_holding_queue_returns_the_holder(queue_url: str) -> None:
    """With on_duplicate="return", enqueueing a key that a holding batch holds returns its id
    even when the holding queue is full: nothing new would be written."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_holding=2, max_active_batches=0))
    log: list[str] = []
    recorder = _recorder_batch(queue, log)
    await queue.open()
    try:
        keyed = await queue.enqueue(recorder, "keyed", key="nightly")
        other = await queue.enqueue(recorder, "other")
        with pytest.raises(flexq.DuplicateJob):
            await queue.enqueue(recorder, "again", key="nightly")
        again = await queue.enqueue(recorder, "again", key="nightly", on_duplicate="return")
        with pytest.raises(flexq.LimitExceeded):
            await queue.enqueue(recorder, "third", key="fresh", on_duplicate="return")
        order = await queue.flex.order("default")
    finally:
        await queue.close()
    assert again == keyed
    assert order == [keyed, other]


async def test_pruning_a_finished_batch_deletes_its_chunks(sqlite_url: str) -> None:
    """When retention prunes a finished batch job, its stored chunks go with it."""
    queue = make_queue(sqlite_url, retention=0.05, prune_interval=0.05)

    @queue.batch(scope=2)
    class Short:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(7))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        job_id = await queue.enqueue(Short)
        assert (await queue.wait(job_id, timeout=WAIT)).state is flexq.State.COMPLETED

        async def pruned() -> bool:
            try:
                await queue.get(job_id)
            except flexq.JobNotFound:
                return True
            return False

        await until(pruned)
    db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        chunks = db.execute("SELECT COUNT(*) FROM flexq_chunks").fetchone()[0]
        batches = db.execute("SELECT COUNT(*) FROM flexq_batches").fetchone()[0]
    finally:
        db.close()
    assert (chunks, batches) == (0, 0)


def _shared(queue_url: str) -> flexq.abc.Store | str:
    """What two queues of one test pass to share one store (as two processes would)."""
    from flexq._store.memory import MemoryStore

    return MemoryStore() if queue_url == "memory://" else queue_url


async def test_a_batch_stopped_at_shutdown_resumes_after_its_checkpoints(queue_url: str) -> None:
    """A batch released at shutdown mid-chunks runs again without re-running start, and the
    chunks checkpointed before the shutdown do not run again."""
    store = _shared(queue_url)
    starts: list[int] = []
    executed: list[tuple[int, int | None]] = []
    blocked = anyio.Event()

    def register(queue: flexq.Queue, run: int, block: bool) -> type:
        @queue.batch(scope=2, name="resumable")
        class Resumable:
            async def start(self, ctx: flexq.BatchContext) -> list[int]:
                starts.append(run)
                return list(range(12))

            async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
                executed.append((run, ctx.chunk))
                if block and ctx.chunk == 3:
                    blocked.set()
                    await anyio.sleep_forever()

            async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> int:
                return summary.items_processed

        return Resumable

    first = make_queue(store, grace_period=0.1)
    batch = register(first, 1, block=True)
    async with first:
        job_id = await first.enqueue(batch)
        with anyio.fail_after(WAIT):
            await blocked.wait()

        async def three_checkpointed() -> bool:
            return (await progress_of(first, job_id)).chunks_succeeded == 3

        await until(three_checkpointed)
    second = make_queue(store)
    register(second, 2, block=False)
    async with second:
        info = await second.wait(job_id, timeout=WAIT)
    assert info.state is flexq.State.COMPLETED
    assert info.attempts == 1  # the attempt stopped at shutdown is not counted
    assert info.result == 12
    assert starts == [1]
    assert executed == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 3), (2, 4), (2, 5)]
    assert info.progress == flexq.BatchProgress(12, 12, 0, 6, 6, 0)


async def test_abort_from_another_process_stops_a_running_batch(queue_url: str) -> None:
    """An abort through another queue on the same store reaches the worker with its next
    lease renewal: the batch ends ABORTED, finish not run."""
    store = _shared(queue_url)
    worker = make_queue(store, lease=0.3)
    operator = make_queue(store)
    log: list[str] = []
    started = anyio.Event()
    blocked = _recorder_batch(worker, log, block_chunk=1, started=started)
    _recorder_batch(operator, log)  # registers the same name: the operator may enqueue it
    async with worker:
        job_id = await worker.enqueue(blocked, "remote")
        with anyio.fail_after(WAIT):
            await started.wait()
        await operator.open()
        try:
            assert await operator.abort(job_id) is flexq.State.PROCESSING
        finally:
            await operator.close()
        info = await worker.wait(job_id, timeout=WAIT)
    assert info.state is flexq.State.ABORTED
    assert "finish remote" not in log


async def test_a_start_that_returns_no_items_fails_clearly(queue_url: str) -> None:
    """A start that returns something that is not iterable (None, say) fails the batch."""
    queue = make_queue(queue_url)

    @queue.batch(retries=2)
    class Forgot:
        async def start(self, ctx: flexq.BatchContext) -> None:
            pass

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        info = await queue.wait(await queue.enqueue(Forgot), timeout=WAIT)
    assert (info.state, info.attempts) == (flexq.State.FAILED, 1)
    assert info.error is not None
    assert "start must return or yield items, not None" in info.error.message


async def test_batch_arguments_are_checked_against_start_at_enqueue(queue_url: str) -> None:
    """enqueue binds its arguments to start's parameters after ctx, and writes nothing if
    they do not fit."""
    queue = make_queue(queue_url)

    @queue.batch
    class Takes:
        async def start(self, ctx: flexq.BatchContext, since: str, *, limit: int = 5) -> list[int]:
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    class NeedsInit(Takes):
        def __init__(self, db: str) -> None:
            self.db = db

    with pytest.raises(flexq.InvalidArguments, match="constructible without arguments"):
        queue.batch(name="needs-init")(NeedsInit)
    await queue.open()
    try:
        for args, kwargs in (((), {}), (("a", "b"), {}), (("a",), {"other": 1})):
            with pytest.raises(flexq.InvalidArguments):
                await queue.enqueue(Takes, *args, kwargs=kwargs)
        job_id = await queue.enqueue(Takes, "2026-01-01", kwargs={"limit": 2})
        info = await queue.get(job_id)
        counts = await queue.counts()
    finally:
        await queue.close()
    assert (info.args, dict(info.kwargs)) == (("2026-01-01",), {"limit": 2})
    assert sum(counts.values()) == 1
