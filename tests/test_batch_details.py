"""Details of batch runs: when checkpoints are written, how chunk errors are recorded."""

from __future__ import annotations

import anyio

import flexq
from flexq._batch import CHECKPOINT_DELAY, CHECKPOINT_GROUP
from flexq.testing import batch_summary, run_batch
from tests.conftest import make_queue


async def test_a_slow_chunk_is_checkpointed_while_the_next_one_runs(queue_url: str) -> None:
    """A chunk that ended is durable (and counted in progress) within about CHECKPOINT_DELAY,
    although fewer than CHECKPOINT_GROUP chunks ended and the next chunk is still running."""
    queue = make_queue(queue_url)
    gate = anyio.Event()

    @queue.batch(scope=10, name="tests.Slow")
    class Slow:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(10 * (CHECKPOINT_GROUP + 2)))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if ctx.chunk:  # every chunk after the first waits for the test
                await gate.wait()

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    async with queue:
        job_id = await queue.enqueue(Slow)
        with anyio.fail_after(10 * CHECKPOINT_DELAY + 5):
            while True:
                progress = (await queue.get(job_id)).progress
                assert isinstance(progress, flexq.BatchProgress)
                if progress.items_processed:
                    break
                await anyio.sleep(0.01)
        assert progress.items_processed == 10
        assert progress.chunks_succeeded == 1
        gate.set()
        info = await queue.wait(job_id, timeout=10)
    assert info.progress == flexq.BatchProgress(180, 180, 0, 18, 18, 0)


async def test_a_chunk_error_names_flexq_errors_by_their_public_name(queue_url: str) -> None:
    """A chunk that hit max_children_per_run records flexq.LimitExceeded, as a job would; a
    retried chunk enqueues its children again (each try has a context of its own)."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_children_per_run=2))
    tries = []

    @queue.task
    async def child() -> None:
        pass

    @queue.batch(retries=1, name="tests.Parent")
    class Parent:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [1]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            tries.append(ctx.chunk)
            for _ in range(3):
                await ctx.enqueue(child)

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    info = await run_batch(queue, Parent, timeout=10)
    assert info.state is flexq.State.COMPLETED
    assert tries == [0, 0]
    (error,) = (await batch_summary(queue, info.id)).errors
    assert (error.chunk, error.type, error.tries) == (0, "flexq.LimitExceeded", 2)
    assert "at most 2 jobs" in error.message
    await queue.open()
    try:
        assert sum((await queue.counts(task=child)).values()) == 4  # 2 per try
    finally:
        await queue.close()


async def test_an_aborted_batch_keeps_the_chunks_that_ended_before_the_abort(
    queue_url: str,
) -> None:
    """Chunks that ended before an abort count in the progress, even those whose checkpoint
    was not written yet; the chunk that was running does not."""
    queue = make_queue(queue_url)
    ended: list[int] = []
    third_running = anyio.Event()

    @queue.batch(scope=1, name="tests.Aborted")
    class Aborted:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return list(range(10))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if ctx.chunk == 2:
                third_running.set()
                await anyio.sleep_forever()
            ended.append(chunk[0])

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            raise AssertionError("finish does not run after an abort")

    async with queue:
        job_id = await queue.enqueue(Aborted)
        with anyio.fail_after(10):
            await third_running.wait()
        await queue.abort(job_id)
        info = await queue.wait(job_id, timeout=10)
    assert info.state is flexq.State.ABORTED
    assert ended == [0, 1]
    assert info.progress == flexq.BatchProgress(2, 10, 0, 10, 2, 0)
