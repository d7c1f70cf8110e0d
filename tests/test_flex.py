"""The holding (flex) queue, its limits and the active slots, through ``queue.flex``.

``max_active_batches=0`` keeps every batch job HOLDING, so that the order and the limits can be
read without workers racing them. Every test runs under asyncio and trio, on memory and SQLite.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import anyio
import pytest

import flexq
from tests.conftest import make_queue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

WAIT = 30
HOLD_ALL = flexq.Limits(max_active_batches=0)


def register_noop(queue: flexq.Queue, log: list[str] | None = None) -> type:
    """A batch of one item per job that logs its label when it starts."""

    @queue.batch(name="noop")
    class Noop:
        async def start(self, ctx: flexq.BatchContext, label: str) -> list[str]:
            if log is not None:
                log.append(label)
            return [label]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[str]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    return Noop


@pytest.fixture
async def holding(queue_url: str) -> AsyncIterator[tuple[flexq.Queue, type]]:
    """An open queue (no workers) whose batch jobs all stay HOLDING."""
    queue = make_queue(queue_url, limits=HOLD_ALL)
    noop = register_noop(queue)
    await queue.open()
    try:
        yield queue, noop
    finally:
        await queue.close()


async def fill(queue: flexq.Queue, batch: type, n: int, tenant: str = "acme") -> list[str]:
    return [await queue.enqueue(batch, f"{tenant}-{i}", tenant=tenant) for i in range(n)]


# -- moves ----------------------------------------------------------------------------------


async def test_holding_jobs_wait_in_fifo_order(holding: tuple[flexq.Queue, type]) -> None:
    """Batch jobs wait HOLDING, in the order they were enqueued, per tenant."""
    queue, noop = holding
    ids = await fill(queue, noop, 4)
    other = await fill(queue, noop, 2, tenant="zeta")
    assert await queue.flex.order("acme") == ids
    assert await queue.flex.order("zeta") == other
    assert await queue.flex.order("nobody") == []
    assert {info.state for info in await queue.get_many(ids)} == {flexq.State.HOLDING}


async def test_move_to_front_and_to_end(holding: tuple[flexq.Queue, type]) -> None:
    """move_to_front/move_to_end put a job first/last; a second call changes nothing."""
    queue, noop = holding
    a, b, c, d = await fill(queue, noop, 4)
    assert await queue.flex.move_to_front(c) is True
    assert await queue.flex.order("acme") == [c, a, b, d]
    assert await queue.flex.move_to_front(c) is False
    assert await queue.flex.move_to_end(a) is True
    assert await queue.flex.order("acme") == [c, b, d, a]
    assert await queue.flex.move_to_end(a) is False
    assert await queue.flex.move_to_end(c) is True
    assert await queue.flex.move_to_front(d) is True
    assert await queue.flex.order("acme") == [d, b, a, c]


async def test_move_before_and_after(holding: tuple[flexq.Queue, type]) -> None:
    """move_before/move_after put a job next to another; False when it is there already."""
    queue, noop = holding
    a, b, c, d = await fill(queue, noop, 4)
    assert await queue.flex.move_before(d, b) is True
    assert await queue.flex.order("acme") == [a, d, b, c]
    assert await queue.flex.move_before(d, b) is False
    assert await queue.flex.move_before(a, d) is False
    assert await queue.flex.move_after(a, c) is True
    assert await queue.flex.order("acme") == [d, b, c, a]
    assert await queue.flex.move_after(a, c) is False
    assert await queue.flex.move_after(b, d) is False
    assert await queue.flex.move_before(c, d) is True
    assert await queue.flex.order("acme") == [c, d, b, a]
    assert await queue.flex.move_after(c, a) is True
    assert await queue.flex.order("acme") == [d, b, a, c]


async def test_move_to_an_index_works_like_list_insert(holding: tuple[flexq.Queue, type]) -> None:
    """move_to(job, i) takes the job out and inserts it at i (past the end: last)."""
    queue, noop = holding
    model = await fill(queue, noop, 5)
    for job_index, place in [(0, 2), (4, 0), (2, 4), (1, 1), (3, 99), (4, 4), (0, 0), (2, 3)]:
        job = model[job_index]
        expected = [other for other in model if other != job]
        expected.insert(min(place, len(expected)), job)
        assert await queue.flex.move_to(job, place) is (expected != model), (job_index, place)
        model = expected
        assert await queue.flex.order("acme") == model
    with pytest.raises(flexq.InvalidArguments):
        await queue.flex.move_to(model[0], -1)
    with pytest.raises(flexq.InvalidArguments):
        await queue.flex.move_to(model[0], True)


async def test_a_lone_holding_job_never_moves(holding: tuple[flexq.Queue, type]) -> None:
    """With one job in the queue every move returns False."""
    queue, noop = holding
    (only,) = await fill(queue, noop, 1)
    assert await queue.flex.move_to_front(only) is False
    assert await queue.flex.move_to_end(only) is False
    assert await queue.flex.move_to(only, 0) is False
    assert await queue.flex.move_to(only, 5) is False
    assert await queue.flex.order("acme") == [only]


async def test_moves_refuse_unknown_not_holding_foreign_and_self(
    holding: tuple[flexq.Queue, type],
) -> None:
    """Unknown ids raise JobNotFound, jobs not HOLDING NotHolding, another tenant's job or the
    job itself InvalidArguments; the order does not change."""
    queue, noop = holding
    a, b, c = await fill(queue, noop, 3)
    (foreign,) = await fill(queue, noop, 1, tenant="zeta")
    aborted = await queue.enqueue(noop, "gone", tenant="acme")
    await queue.abort(aborted)

    @queue.task
    async def plain() -> None:
        pass

    queued = await queue.enqueue(plain, tenant="acme")
    flex = queue.flex
    unknown: list[Callable[[], Awaitable[bool]]] = [
        partial(flex.move_to_front, "nope"),
        partial(flex.move_to_end, "nope"),
        partial(flex.move_to, "nope", 0),
        partial(flex.move_before, "nope", a),
        partial(flex.move_after, a, "nope"),
    ]
    for call in unknown:
        with pytest.raises(flexq.JobNotFound):
            await call()
    for job_id, state in ((aborted, "ABORTED"), (queued, "QUEUED")):
        moves: list[Callable[[], Awaitable[bool]]] = [
            partial(flex.move_to_front, job_id),
            partial(flex.move_to_end, job_id),
            partial(flex.move_to, job_id, 1),
            partial(flex.move_before, job_id, a),
            partial(flex.move_after, b, job_id),
        ]
        for move in moves:
            with pytest.raises(flexq.NotHolding) as caught:
                await move()
            assert (caught.value.job_id, caught.value.state) == (job_id, state)
    with pytest.raises(flexq.InvalidArguments, match="zeta"):
        await flex.move_before(a, foreign)
    with pytest.raises(flexq.InvalidArguments, match="zeta"):
        await flex.move_after(foreign, c)
    with pytest.raises(flexq.InvalidArguments, match="itself"):
        await flex.move_before(b, b)
    with pytest.raises(flexq.InvalidArguments, match="itself"):
        await flex.move_after(b, b)
    assert await flex.order("acme") == [a, b, c]
    assert await flex.order("zeta") == [foreign]


async def test_many_moves_between_neighbours_keep_the_order(
    holding: tuple[flexq.Queue, type],
) -> None:
    """Alternating moves of two neighbours halve the gap between positions past float
    precision; the store renumbers and the order stays right after every move."""
    queue, noop = holding
    first, x, y, last = await fill(queue, noop, 4)
    model = [first, x, y, last]
    for step in range(70):
        if step % 2:
            mover, anchor = model[1], model[2]
            assert await queue.flex.move_after(mover, anchor) is True
        else:
            mover, anchor = model[2], model[1]
            assert await queue.flex.move_before(mover, anchor) is True
        model[1], model[2] = model[2], model[1]
        assert await queue.flex.order("acme") == model, step
    for step in range(70):  # the same with the tail of the queue
        mover, anchor = model[2], model[1]
        if step % 2:
            assert await queue.flex.move_before(mover, anchor) is True
        else:
            assert await queue.flex.move_to(mover, 1) is True
        model[1], model[2] = model[2], model[1]
        assert await queue.flex.order("acme") == model, step
    assert await queue.flex.move_to_front(last) is True
    assert await queue.flex.order("acme") == [last, *model[:3]]


async def test_repeated_moves_to_the_front_and_end(holding: tuple[flexq.Queue, type]) -> None:
    """Hundreds of moves to either end keep the order a list model predicts."""
    queue, noop = holding
    model = await fill(queue, noop, 6)
    for step in range(200):
        job = model[(step * 7) % len(model)]
        model.remove(job)
        if step % 3:
            model.insert(0, job)
            await queue.flex.move_to_front(job)
        else:
            model.append(job)
            await queue.flex.move_to_end(job)
    assert await queue.flex.order("acme") == model


# -- limits ---------------------------------------------------------------------------------


async def test_holding_limit_edges_99_100_101(holding: tuple[flexq.Queue, type]) -> None:
    """99 and 100 holding jobs are fine; the 101st raises LimitExceeded and writes nothing."""
    queue, noop = holding
    ids = await fill(queue, noop, 99)
    assert (await queue.limits("acme")).holding == 99
    ids.append(await queue.enqueue(noop, "100th", tenant="acme"))
    usage = await queue.limits("acme")
    assert (usage.holding, usage.active_batches) == (100, 0)
    with pytest.raises(flexq.LimitExceeded, match="max_holding=100"):
        await queue.enqueue(noop, "101st", tenant="acme")
    assert await queue.flex.order("acme") == ids
    assert (await queue.counts(tenant="acme"))[flexq.State.HOLDING] == 100
    assert sum((await queue.counts()).values()) == 100
    # Another tenant's queue is its own.
    await queue.enqueue(noop, "other", tenant="zeta")
    # A holding job that leaves makes room for one more.
    await queue.abort(ids[50])
    ids.append(await queue.enqueue(noop, "again", tenant="acme"))
    with pytest.raises(flexq.LimitExceeded):
        await queue.enqueue(noop, "over", tenant="acme")
    assert (await queue.limits("acme")).holding == 100


async def test_enqueue_many_past_the_holding_limit_writes_nothing(
    holding: tuple[flexq.Queue, type],
) -> None:
    """A unit that would take the holding queue past max_holding is refused whole, other jobs
    of the unit included; one that reaches it exactly is written."""
    queue, noop = holding

    @queue.task
    async def plain() -> None:
        pass

    ids = await fill(queue, noop, 97)
    calls = [flexq.Call(plain), *(flexq.Call(noop, f"many-{i}") for i in range(4))]
    with pytest.raises(flexq.LimitExceeded):
        await queue.enqueue_many(calls, tenant="acme")
    assert sum((await queue.counts()).values()) == 97
    assert await queue.flex.order("acme") == ids
    written = await queue.enqueue_many(calls[:4], tenant="acme")
    assert await queue.flex.order("acme") == ids + written[1:]
    assert (await queue.limits("acme")).holding == 100
    with pytest.raises(flexq.LimitExceeded):
        await queue.enqueue_many([flexq.Call(noop, "one more")], tenant="acme")


async def test_admitted_jobs_do_not_count_against_the_holding_limit(queue_url: str) -> None:
    """Jobs admitted to a free slot are not holding: max_holding counts the waiting ones."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_holding=2, max_active_batches=1))
    noop = register_noop(queue)
    await queue.open()
    try:
        ids = await fill(queue, noop, 3)
        assert [info.state for info in await queue.get_many(ids)] == [
            flexq.State.QUEUED, flexq.State.HOLDING, flexq.State.HOLDING,
        ]  # fmt: skip
        with pytest.raises(flexq.LimitExceeded, match="max_holding=2"):
            await queue.enqueue(noop, "fourth", tenant="acme")
        usage = await queue.limits("acme")
        assert (usage.holding, usage.active_batches) == (2, 1)
        assert str(usage) == "acme: holding 2/2, active 1/1"
    finally:
        await queue.close()


async def test_tenant_limits_override_the_queue_limits(queue_url: str) -> None:
    """A tenant's own Limits replace the queue's for that tenant only."""
    small = flexq.Limits(max_holding=2, max_active_batches=0, max_children_per_run=7)
    queue = make_queue(queue_url, limits=HOLD_ALL, tenant_limits={"small": small})
    noop = register_noop(queue)
    assert queue.limits_of("small") == small
    assert queue.limits_of("anyone") == HOLD_ALL
    await queue.open()
    try:
        await fill(queue, noop, 2, tenant="small")
        with pytest.raises(flexq.LimitExceeded, match="max_holding=2"):
            await queue.enqueue(noop, "third", tenant="small")
        await fill(queue, noop, 3, tenant="big")
        small_usage, big_usage = await queue.limits("small"), await queue.limits("big")
    finally:
        await queue.close()
    assert small_usage == flexq.LimitUsage("small", small, holding=2, active_batches=0)
    assert big_usage == flexq.LimitUsage("big", HOLD_ALL, holding=3, active_batches=0)


def test_limits_reject_bad_values() -> None:
    """Limits are ints >= 0; the queue takes only Limits objects."""
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(flexq.InvalidArguments):
            flexq.Limits(max_holding=bad)  # type: ignore[arg-type]
    with pytest.raises(flexq.InvalidArguments):
        flexq.Queue("memory://", limits={"max_holding": 3})  # type: ignore[arg-type]
    with pytest.raises(flexq.InvalidArguments):
        flexq.Queue("memory://", tenant_limits={"a": 3})  # type: ignore[dict-item]
    assert flexq.Limits() == flexq.Limits(100, 5, 50)


# -- active slots ---------------------------------------------------------------------------


async def test_a_freed_slot_admits_the_first_holding_job_in_flex_order(queue_url: str) -> None:
    """After a reorder, freed slots admit holding jobs in the new order, in the same call that
    freed them."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    noop = register_noop(queue)
    await queue.open()  # no workers: slots are freed by aborts
    try:
        active, b, c, d = await fill(queue, noop, 4)
        assert await queue.flex.move_to_front(d)
        assert await queue.flex.move_after(b, c)
        assert await queue.flex.order("acme") == [d, c, b]
        admitted = []
        for _ in range(3):
            await queue.abort(active)
            (active,) = [i.id for i in await queue.get_many([b, c, d]) if i.state == "QUEUED"]
            admitted.append(active)
        assert admitted == [d, c, b]
        assert await queue.flex.order("acme") == []
    finally:
        await queue.close()


async def test_batches_run_in_the_reordered_holding_order(queue_url: str) -> None:
    """With one active slot, batch jobs run one at a time in flex order, reorders included."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    log: list[str] = []
    release = anyio.Event()
    running = anyio.Event()

    @queue.batch
    class Gate:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            log.append("gate")
            running.set()
            await release.wait()
            return [1]

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    noop = register_noop(queue, log)
    async with queue:
        gate = await queue.enqueue(Gate, tenant="acme")
        with anyio.fail_after(WAIT):
            await running.wait()
        b, c, d, e = await fill(queue, noop, 4)
        await queue.flex.move_to_front(e)
        await queue.flex.move_before(c, b)
        await queue.flex.move_to(d, 1)
        assert await queue.flex.order("acme") == [e, d, c, b]
        usage = await queue.limits("acme")
        release.set()
        infos = [await queue.wait(job_id, timeout=WAIT) for job_id in (gate, b, c, d, e)]
    assert (usage.holding, usage.active_batches) == (4, 1)
    assert {info.state for info in infos} == {flexq.State.COMPLETED}
    assert log == ["gate", "acme-3", "acme-2", "acme-1", "acme-0"]


async def test_two_tenants_slots_are_independent(queue_url: str) -> None:
    """A tenant whose slots are full does not hold back another tenant's batches."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=1))
    release = anyio.Event()
    running = anyio.Event()

    @queue.batch
    class Blocker:
        async def start(self, ctx: flexq.BatchContext) -> list[int]:
            running.set()
            await release.wait()
            return []

        async def execute(self, ctx: flexq.BatchContext, chunk: list[int]) -> None:
            pass

        async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> None:
            pass

    noop = register_noop(queue)
    async with queue:
        blocker = await queue.enqueue(Blocker, tenant="busy")
        with anyio.fail_after(WAIT):
            await running.wait()
        waiting = await queue.enqueue(noop, "waits", tenant="busy")
        others = await fill(queue, noop, 3, tenant="free")
        free_infos = [await queue.wait(job_id, timeout=WAIT) for job_id in others]
        busy_usage = await queue.limits("busy")
        free_usage = await queue.limits("free")
        waiting_state = (await queue.get(waiting)).state
        release.set()
        done = [await queue.wait(job_id, timeout=WAIT) for job_id in (blocker, waiting)]
        after = await queue.limits("busy")
    assert {info.state for info in free_infos} == {flexq.State.COMPLETED}
    assert waiting_state is flexq.State.HOLDING
    assert (busy_usage.holding, busy_usage.active_batches) == (1, 1)
    assert (free_usage.holding, free_usage.active_batches) == (0, 0)
    assert {info.state for info in done} == {flexq.State.COMPLETED}
    assert (after.holding, after.active_batches) == (0, 0)


async def test_active_slots_are_counted_and_capped(queue_url: str) -> None:
    """At most max_active_batches batch jobs of a tenant are admitted; the rest hold."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_active_batches=3))
    noop = register_noop(queue)
    await queue.open()
    try:
        ids = await fill(queue, noop, 5)
        states = [info.state for info in await queue.get_many(ids)]
        usage = await queue.limits("acme")
        order = await queue.flex.order("acme")
    finally:
        await queue.close()
    assert states == [flexq.State.QUEUED] * 3 + [flexq.State.HOLDING] * 2
    assert usage == flexq.LimitUsage("acme", queue.limits_of("acme"), 2, 3)
    assert order == ids[3:]


async def test_holding_and_moves_need_an_open_queue(queue_url: str) -> None:
    """queue.flex and queue.limits raise QueueClosed before the queue opens."""
    queue = make_queue(queue_url)
    with pytest.raises(flexq.QueueClosed):
        await queue.flex.order("acme")
    with pytest.raises(flexq.QueueClosed):
        await queue.flex.move_to_front("x")
    with pytest.raises(flexq.QueueClosed):
        await queue.limits("acme")


async def test_holding_jobs_are_admitted_when_a_process_with_more_slots_polls(
    queue_url: str,
) -> None:
    """Jobs held under max_active_batches=0 are admitted, in flex order, by a process whose
    limits give slots (its dispatcher admits into free slots as it polls)."""
    store: flexq.abc.Store | str = queue_url
    if queue_url == "memory://":
        from flexq._store.memory import MemoryStore

        store = MemoryStore()
    log: list[str] = []
    producer = make_queue(store, limits=HOLD_ALL)
    noop = register_noop(producer)
    await producer.open()
    try:
        ids = await fill(producer, noop, 3)
        await producer.flex.move_to_front(ids[2])
    finally:
        await producer.close()
    worker = make_queue(store, limits=flexq.Limits(max_active_batches=1))
    register_noop(worker, log)
    await worker.open()
    try:
        explanation = await worker.explain(ids[2])
    finally:
        await worker.close()
    assert explanation.whys == (flexq.Why.HOLDING, flexq.Why.HOLDING)
    assert "a slot is free" in explanation.reasons[1].message
    async with worker:
        infos = [await worker.wait(job_id, timeout=WAIT) for job_id in ids]
    assert {info.state for info in infos} == {flexq.State.COMPLETED}
    assert log == ["acme-2", "acme-0", "acme-1"]


async def test_with_default_limits_5_run_and_100_hold_then_enqueue_is_refused(
    queue_url: str,
) -> None:
    """Default limits: 5 batch jobs admitted, 100 holding; the next raises LimitExceeded."""
    queue = make_queue(queue_url)
    noop = register_noop(queue)
    await queue.open()  # no workers: the admitted jobs stay QUEUED
    try:
        ids = await fill(queue, noop, 105)
        with pytest.raises(flexq.LimitExceeded, match="max_holding=100"):
            await queue.enqueue(noop, "106th", tenant="acme")
        usage = await queue.limits("acme")
        counts = await queue.counts(tenant="acme")
        order = await queue.flex.order("acme")
    finally:
        await queue.close()
    assert usage == flexq.LimitUsage("acme", flexq.Limits(), holding=100, active_batches=5)
    assert str(usage) == "acme: holding 100/100, active 5/5"
    assert (counts[flexq.State.QUEUED], counts[flexq.State.HOLDING]) == (5, 100)
    assert order == ids[5:]
