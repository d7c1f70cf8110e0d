"""flexq.testing: the helpers users' own tests call, on every store and under both loops."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import flexq
import flexq.testing
from flexq.testing import (
    batch_summary,
    enqueue_batches,
    flex_positions,
    run_batch,
    run_until_final,
)
from tests.conftest import make_queue


def batch_queue(url: str, **options: Any) -> tuple[flexq.Queue, type, list[str]]:
    """A queue with a registered batch class; the list records each job's ``start`` argument
    in the order the jobs started."""
    queue = make_queue(url, **options)
    started: list[str] = []

    @queue.batch(scope=10, name="tests.Count")
    class Count:
        async def start(self, ctx: flexq.BatchContext, label: str, n: int = 25) -> list[int]:
            started.append(label)
            return list(range(n))

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if -1 in chunk:
                raise ValueError("no negative items")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> str:
            return f"{summary.items_processed} items"

    return queue, Count, started


def test_testing_exports_its_helpers() -> None:
    """flexq.testing's __all__ names its public helpers, and each is documented."""
    assert flexq.testing.__all__ == sorted(flexq.testing.__all__)
    for name in flexq.testing.__all__:
        assert getattr(flexq.testing, name).__doc__, name


async def test_run_batch_runs_a_closed_queue_and_closes_it_again(queue_url: str) -> None:
    """run_batch opens the queue and its workers, returns the final job, and closes it."""
    queue, count, started = batch_queue(queue_url)
    info = await run_batch(queue, count, "a", tenant="acme", timeout=10)
    assert info.state is flexq.State.COMPLETED
    assert info.result == "25 items"
    assert info.tenant == "acme"
    assert info.progress == flexq.BatchProgress(25, 25, 0, 3, 3, 0)
    assert started == ["a"]
    with pytest.raises(flexq.QueueClosed):
        await queue.get(info.id)
    await queue.open()  # the store kept the job (memory:// too)
    try:
        assert (await queue.get(info.id)).state is flexq.State.COMPLETED
    finally:
        await queue.close()


async def test_run_batch_on_an_open_queue_stops_the_workers_it_started(queue_url: str) -> None:
    """On an open queue without workers, run_batch runs them for the call and leaves it open."""
    queue, count, _ = batch_queue(queue_url)
    await queue.open()
    try:
        info = await run_batch(queue, count, "a", kwargs={"n": 5}, timeout=10)
        assert info.progress == flexq.BatchProgress(5, 5, 0, 1, 1, 0)
        (later,) = await enqueue_batches(queue, count, 1, "b")
        await anyio.sleep(0.3)  # six poll intervals: a worker left running would take it
        assert (await queue.get(later)).state is flexq.State.QUEUED
    finally:
        await queue.close()


async def test_run_batch_uses_a_running_queue(queue_url: str) -> None:
    """On a running queue, run_batch enqueues and waits; the workers keep running."""
    queue, count, _ = batch_queue(queue_url)
    async with queue:
        info = await run_batch(queue, count, "a", timeout=10)
        assert info.state is flexq.State.COMPLETED
        assert queue.statistics().completed == 1
        again = await run_batch(queue, count, "b", timeout=10)
        assert again.state is flexq.State.COMPLETED


async def test_run_batch_returns_a_batch_with_failed_chunks(queue_url: str) -> None:
    """A chunk that fails every try is counted; batch_summary gives its error."""
    queue, _, _ = batch_queue(queue_url)

    @queue.batch(scope=2, retries=1, name="tests.Mixed")
    class Mixed:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            return [1, 2, -1, 3, 4]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            if -1 in chunk:
                raise ValueError("no negative items")

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    info = await run_batch(queue, Mixed, timeout=10)
    assert info.state is flexq.State.COMPLETED
    assert info.progress == flexq.BatchProgress(5, 5, 1, 3, 2, 1)
    summary = await batch_summary(queue, info.id)
    assert not summary.ok
    assert [(e.chunk, e.type, e.message, e.tries) for e in summary.errors] == [
        (1, "builtins.ValueError", "no negative items", 2)
    ]


async def test_run_batch_times_out_with_the_reason(queue_url: str) -> None:
    """A batch that cannot get a slot makes run_batch raise WaitTimeout saying why."""
    queue, count, started = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    with pytest.raises(flexq.WaitTimeout, match="holding queue") as caught:
        await run_batch(queue, count, "a", tenant="acme", timeout=0.3)
    assert "0 of its 0 active batch slots" in str(caught.value)
    assert started == []


async def test_run_batch_rejects_what_is_not_a_batch_class_of_the_queue() -> None:
    """A plain task, or a batch class of another queue, is an InvalidArguments."""
    queue, _, _ = batch_queue("memory://")
    _, other_count, _ = batch_queue("memory://")

    @queue.task
    async def plain() -> None:
        pass

    for wrong in (other_count, type(plain), int):
        with pytest.raises(flexq.InvalidArguments, match="not a batch class"):
            await run_batch(queue, wrong)


async def test_enqueue_batches_waits_them_in_order(queue_url: str) -> None:
    """enqueue_batches enqueues n HOLDING jobs whose flex order is their enqueue order."""
    queue, count, _ = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    async with queue:
        ids = await enqueue_batches(queue, count, 4, "x", tenant="acme")
        assert len(set(ids)) == 4
        assert await queue.flex.order("acme") == ids
        assert await flex_positions(queue, ids) == [0, 1, 2, 3]
        infos = await queue.get_many(ids)
        assert {info.state for info in infos} == {flexq.State.HOLDING}
        assert {info.args for info in infos} == {("x",)}


async def test_enqueue_batches_writes_nothing_past_max_holding(queue_url: str) -> None:
    """More jobs than the holding queue has room for raise LimitExceeded and write none."""
    limits = flexq.Limits(max_holding=3, max_active_batches=0)
    queue, count, _ = batch_queue(queue_url, limits=limits)
    async with queue:
        await enqueue_batches(queue, count, 2, "x")
        with pytest.raises(flexq.LimitExceeded):
            await enqueue_batches(queue, count, 2, "y")
        assert (await queue.limits("default")).holding == 2
        assert await enqueue_batches(queue, count, 0, "z") == []


async def test_enqueue_batches_opens_a_closed_queue_for_the_call(queue_url: str) -> None:
    """On a closed queue, enqueue_batches opens it, writes, and closes it again."""
    queue, count, _ = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    ids = await enqueue_batches(queue, count, 2, "x")
    assert await flex_positions(queue, ids) == [0, 1]
    with pytest.raises(flexq.QueueClosed):
        await queue.flex.order("default")


async def test_enqueue_batches_checks_n() -> None:
    """A negative or non-int n is an InvalidArguments."""
    queue, count, _ = batch_queue("memory://")
    for wrong in (-1, 1.5, True):
        with pytest.raises(flexq.InvalidArguments, match="n must be"):
            await enqueue_batches(queue, count, wrong, "x")  # type: ignore[arg-type]


async def test_flex_positions_follows_moves_and_tenants(queue_url: str) -> None:
    """flex_positions places each job in its own tenant's queue; None if not HOLDING."""
    queue, count, _ = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=0))
    async with queue:
        first, second, third = await enqueue_batches(queue, count, 3, "a", tenant="acme")
        (other,) = await enqueue_batches(queue, count, 1, "b", tenant="globex")
        await queue.flex.move_to_front(third)
        assert await flex_positions(queue, [first, second, third, other]) == [1, 2, 0, 0]
        await queue.abort(second)
        assert await flex_positions(queue, [first, second, third, "unknown"]) == [
            1,
            None,
            0,
            None,
        ]


async def test_run_until_final_admits_jobs_in_flex_order(queue_url: str) -> None:
    """With one active slot, the jobs run in the holding queue's order after a reorder."""
    queue, count, started = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    await queue.open()
    try:
        ids = await enqueue_batches(queue, count, 1, "first")
        ids += [(await enqueue_batches(queue, count, 1, label))[0] for label in ("b", "c", "d")]
        await queue.flex.move_to_front(ids[3])  # ids[0] took the slot at once
        await queue.flex.move_to_end(ids[1])
        infos = await run_until_final(queue, ids, timeout=10)
    finally:
        await queue.close()
    assert [info.state for info in infos] == [flexq.State.COMPLETED] * 4
    assert [info.id for info in infos] == ids
    assert started == ["first", "d", "c", "b"]


async def test_batch_summary_before_start_and_of_other_jobs(queue_url: str) -> None:
    """A HOLDING batch job has an empty summary; a plain job has none; an unknown id raises."""
    queue, count, _ = batch_queue(queue_url, limits=flexq.Limits(max_active_batches=0))

    @queue.task
    async def plain() -> None:
        pass

    async with queue:
        (held,) = await enqueue_batches(queue, count, 1, "x")
        assert await batch_summary(queue, held) == flexq.BatchSummary(held, 0, 0, 0, 0, 0, ())
        plain_id = await queue.enqueue(plain)
        with pytest.raises(flexq.InvalidArguments, match="not a batch job"):
            await batch_summary(queue, plain_id)
        with pytest.raises(flexq.JobNotFound):
            await batch_summary(queue, "unknown")
