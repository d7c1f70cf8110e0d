"""The store contract of batch jobs, the holding queue and active slots, for every store."""

from __future__ import annotations

import pytest

from flexq import (
    BatchProgress,
    InvalidArguments,
    JobNotFound,
    Kind,
    LimitExceeded,
    Limits,
    NotHolding,
    State,
)
from flexq._limits import LimitTable
from flexq._store.base import ChunkDone, DependentJob, Placement
from flexq.abc import EnqueueUnit, NewJob, Outcome, Store

from .test_store_conformance import OWNER, T0, TASKS, claim, job, put

LIMITS = LimitTable(Limits(max_holding=3, max_active_batches=2))


@pytest.fixture
def batches(store: Store) -> Store:
    """The store, with small limits: 3 holding and 2 active batch jobs per tenant."""
    store.set_limits(LIMITS)
    return store


def batch(job_id: str, tenant: str = "acme") -> NewJob:
    return job(job_id, tenant=tenant, kind=Kind.BATCH, max_attempts=1)


async def prepare(store: Store, job_id: str) -> None:
    """Run a claimed batch job's start, with no items: it is then PROCESSING."""
    assert await store.begin_batch(OWNER, job_id) is not None
    assert await store.end_preparing(OWNER, job_id, 0, 0)


async def states(store: Store, *ids: str) -> list[State]:
    return [(await store.get(i)).state for i in ids]


async def test_batch_jobs_fill_the_active_slots_then_hold(batches: Store) -> None:
    """The first jobs take the tenant's free slots (QUEUED); the rest wait HOLDING in order."""
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    assert await states(batches, "b0", "b1", "b2", "b3") == [State.QUEUED] * 2 + [State.HOLDING] * 2
    assert await batches.holding_order("acme") == ["b2", "b3"]
    assert await batches.usage("acme") == (2, 2)
    assert await batches.usage("other") == (0, 0)


async def test_a_full_holding_queue_refuses_the_unit_and_writes_nothing(batches: Store) -> None:
    """Past max_holding HOLDING jobs, the whole unit fails with LimitExceeded."""
    await put(batches, *(batch(f"b{i}") for i in range(5)))
    (refused,) = await batches.enqueue(
        [EnqueueUnit([job("plain"), batch("b5")], "raise")],
        T0,
    )
    assert isinstance(refused, LimitExceeded)
    for missing in ("plain", "b5"):
        with pytest.raises(JobNotFound):
            await batches.get(missing)
    assert await batches.usage("acme") == (3, 2)
    assert await put(batches, batch("elsewhere", tenant="b")) == ["elsewhere"]


async def test_claiming_a_batch_job_moves_it_to_preparing(batches: Store) -> None:
    """A claimed batch job runs its start first: PREPARING."""
    await put(batches, batch("b0"))
    assert await claim(batches) == ["b0"]
    assert (await batches.get("b0")).state is State.PREPARING


async def test_chunks_are_committed_with_the_end_of_start(batches: Store) -> None:
    """Chunks written during start count only once start ends; then they read back in order
    and checkpoints move the counts."""
    await put(batches, batch("b0"))
    await claim(batches)
    assert await batches.begin_batch(OWNER, "b0") is not None
    assert await batches.begin_batch("someone-else", "b0") is None
    assert await batches.add_chunks(OWNER, "b0", 0, [(2, "[1,2]"), (2, "[3,4]")])
    assert await batches.add_chunks(OWNER, "b0", 2, [(1, "[5]")])
    assert not await batches.add_chunks("someone-else", "b0", 3, [(1, "[6]")])
    assert (await batches.get("b0")).progress == BatchProgress(0, 0, 0, 0, 0, 0)
    assert await batches.end_preparing(OWNER, "b0", 5, 3)
    info = await batches.get("b0")
    assert info.state is State.PROCESSING
    assert info.progress == BatchProgress(0, 5, 0, 3, 0, 0)
    assert await batches.pending_chunks("b0", -1, 2) == [(0, "[1,2]"), (1, "[3,4]")]
    assert await batches.pending_chunks("b0", 1, 10) == [(2, "[5]")]
    error = '{"type":"x.E","message":"m","traceback":"","attempt":2,"at":1.0}'
    assert await batches.checkpoint(OWNER, "b0", [ChunkDone(0, 2), ChunkDone(2, 1, error)])
    assert not await batches.checkpoint("someone-else", "b0", [ChunkDone(1, 2)])
    assert await batches.checkpoint(OWNER, "b0", [ChunkDone(0, 2)])  # a repeat counts once
    assert await batches.pending_chunks("b0", -1, 10) == [(1, "[3,4]")]
    counts, errors = await batches.batch_summary("b0")
    assert (counts.items_processed, counts.chunks_succeeded, counts.chunks_failed) == (3, 1, 1)
    assert errors == [(2, error)]
    assert (await batches.get("b0")).progress == BatchProgress(3, 5, 1, 3, 1, 1)


async def test_a_new_attempt_drops_the_chunks_of_an_unfinished_start(batches: Store) -> None:
    """Chunks a crashed start left behind are deleted when the next attempt begins; a
    committed start is kept, and its job goes straight to PROCESSING."""
    await put(batches, batch("b0"))
    await claim(batches)
    await batches.begin_batch(OWNER, "b0")
    await batches.add_chunks(OWNER, "b0", 0, [(1, "[1]")])
    await batches.report(OWNER, [Outcome("b0", State.QUEUED, release=True)], T0)
    await claim(batches)
    counts = await batches.begin_batch(OWNER, "b0")
    assert counts is not None
    assert not counts.prepared
    assert await batches.pending_chunks("b0", -1, 10) == []
    await batches.add_chunks(OWNER, "b0", 0, [(1, "[1]"), (1, "[2]")])
    await batches.end_preparing(OWNER, "b0", 2, 2)
    await batches.checkpoint(OWNER, "b0", [ChunkDone(0, 1)])
    await batches.report(OWNER, [Outcome("b0", State.QUEUED, release=True)], T0)
    await claim(batches)
    counts = await batches.begin_batch(OWNER, "b0")
    assert counts is not None
    assert (counts.prepared, counts.items_processed) == (True, 1)
    assert (await batches.get("b0")).state is State.PROCESSING
    assert await batches.pending_chunks("b0", -1, 10) == [(1, "[2]")]


async def test_a_batch_that_ends_admits_the_next_in_the_same_call(batches: Store) -> None:
    """Completing, failing or aborting an active batch job admits the first holding one."""
    await put(batches, *(batch(f"b{i}") for i in range(5)))
    await batches.reorder("b4", Placement("front"))
    await claim(batches, n=2)
    await prepare(batches, "b0")
    await batches.report(OWNER, [Outcome("b0", State.COMPLETED)], T0)
    assert await states(batches, "b4", "b2", "b3") == [State.QUEUED, State.HOLDING, State.HOLDING]
    await batches.request_abort("b4", T0)
    assert await states(batches, "b2") == [State.QUEUED]
    await batches.recover(T0 + 60, max_lease_expiries=1)  # b1's lease expired: it fails
    assert await states(batches, "b1", "b3") == [State.FAILED, State.QUEUED]
    assert await batches.holding_order("acme") == []


async def test_aborting_a_holding_job_frees_no_slot(batches: Store) -> None:
    """A HOLDING job aborts at once; the active ones stay as they are."""
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    assert await batches.request_abort("b2", T0) is State.ABORTED
    assert await batches.holding_order("acme") == ["b3"]
    assert await batches.usage("acme") == (1, 2)


async def test_admit_fills_slots_that_larger_limits_opened(batches: Store) -> None:
    """After the limits grow, admit() moves holding jobs into the new slots."""
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    assert await batches.admit(T0) == []
    batches.set_limits(LimitTable(Limits(max_holding=3, max_active_batches=3)))
    assert await batches.admit(T0) == ["acme"]
    assert await batches.holding_order("acme") == ["b3"]


async def test_reorder_moves_and_reports_change(batches: Store) -> None:
    """Every placement, and False when the order stays."""
    batches.set_limits(LimitTable(Limits(max_holding=10, max_active_batches=0)))
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    assert await batches.reorder("b3", Placement("front"))
    assert await batches.holding_order("acme") == ["b3", "b0", "b1", "b2"]
    assert not await batches.reorder("b3", Placement("front"))
    assert await batches.reorder("b3", Placement("end"))
    assert not await batches.reorder("b3", Placement("end"))
    assert await batches.reorder("b0", Placement("after", other="b2"))
    assert await batches.holding_order("acme") == ["b1", "b2", "b0", "b3"]
    assert await batches.reorder("b3", Placement("before", other="b1"))
    assert not await batches.reorder("b3", Placement("before", other="b1"))
    assert await batches.reorder("b3", Placement("index", place=2))
    assert await batches.holding_order("acme") == ["b1", "b2", "b3", "b0"]
    assert not await batches.reorder("b3", Placement("index", place=2))
    assert await batches.reorder("b1", Placement("index", place=99))
    assert await batches.holding_order("acme") == ["b2", "b3", "b0", "b1"]


async def test_many_halving_moves_keep_the_order(batches: Store) -> None:
    """Moving jobs back and forth into the same gap (halving it past float precision) still
    gives the right order: the store renumbers the queue when a gap is used up."""
    batches.set_limits(LimitTable(Limits(max_holding=10, max_active_batches=0)))
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    model = ["b0", "b1", "b2", "b3"]
    for step in range(120):
        mover, anchor = ("b2", "b1") if step % 2 else ("b3", "b1")
        await batches.reorder(mover, Placement("after", other=anchor))
        model.remove(mover)
        model.insert(model.index(anchor) + 1, mover)
        assert await batches.holding_order("acme") == model


async def test_reorder_refuses_what_it_cannot_do(batches: Store) -> None:
    """Unknown ids, jobs not HOLDING, another tenant's job, or the job itself."""
    batches.set_limits(LimitTable(Limits(max_holding=10, max_active_batches=1)))
    await put(
        batches,
        batch("active"),
        batch("b0"),
        batch("b1"),
        batch("xa", tenant="b"),
        batch("x", tenant="b"),
    )
    with pytest.raises(JobNotFound):
        await batches.reorder("nope", Placement("front"))
    with pytest.raises(NotHolding):
        await batches.reorder("active", Placement("front"))
    with pytest.raises(NotHolding):
        await batches.reorder("b0", Placement("before", other="active"))
    with pytest.raises(JobNotFound):
        await batches.reorder("b0", Placement("after", other="nope"))
    with pytest.raises(InvalidArguments):
        await batches.reorder("b0", Placement("before", other="x"))
    with pytest.raises(InvalidArguments):
        await batches.reorder("b0", Placement("after", other="b0"))
    assert await batches.holding_order("acme") == ["b0", "b1"]


async def test_wait_facts_of_holding_and_queued_jobs(batches: Store) -> None:
    """Position and usage for a holding job; jobs ahead and other tenants for a queued one."""
    await put(batches, *(batch(f"b{i}") for i in range(4)))
    facts = await batches.wait_facts("b3")
    assert (facts.holding_position, facts.holding, facts.active_batches) == (1, 2, 2)
    await put(batches, job("q0"), job("q1"), job("o", tenant="other"))
    facts = await batches.wait_facts("q1")
    assert facts.holding_position is None
    # q0 only: batch jobs come after queueable jobs of equal priority; tenant "other"
    assert (facts.ready_ahead, facts.tenants_ahead) == (1, 1)
    with pytest.raises(JobNotFound):
        await batches.wait_facts("nope")


async def test_pruning_a_batch_job_removes_its_chunks(batches: Store) -> None:
    """A pruned batch job leaves nothing behind."""
    await put(batches, batch("b0"))
    await claim(batches)
    await batches.begin_batch(OWNER, "b0")
    await batches.add_chunks(OWNER, "b0", 0, [(1, "[1]")])
    await batches.end_preparing(OWNER, "b0", 1, 1)
    await batches.report(OWNER, [Outcome("b0", State.COMPLETED)], T0)
    assert await batches.prune(T0 + 1, 10) == 1
    assert await batches.pending_chunks("b0", -1, 10) == []
    with pytest.raises(JobNotFound):
        await batches.batch_summary("b0")


async def test_tasks_offered_still_apply_to_batches(batches: Store) -> None:
    """Claiming with TASKS that do not include the batch's task leaves it QUEUED."""
    await put(batches, batch("b0"))
    assert await batches.claim(OWNER, {"acme": 1}, {"u"}, T0, T0 + 10) == []
    assert {"t"} <= TASKS
    assert (await batches.get("b0")).state is State.QUEUED


async def test_a_batch_job_waits_for_its_parents_then_holds(batches: Store) -> None:
    """A batch job with parents is WAITING; when they complete it joins the holding queue
    (admitted at once to a free slot); a failed parent aborts it."""
    await put(batches, job("parent"), job("doomed-parent"), batch("b0"), batch("b1"))
    await batches.enqueue_dependent(
        [
            DependentJob(batch("late"), ("parent",)),
            DependentJob(batch("never"), ("doomed-parent",)),
        ],
        T0,
    )
    assert await states(batches, "late", "never") == [State.WAITING, State.WAITING]
    assert await batches.usage("acme") == (0, 2)
    await claim(batches, n=2)  # parent and doomed-parent: queueable jobs come before batches
    await batches.report(
        OWNER,
        [Outcome("parent", State.COMPLETED), Outcome("doomed-parent", State.FAILED, error="{}")],
        T0,
    )
    assert await states(batches, "late", "never") == [State.HOLDING, State.ABORTED]
    assert await batches.holding_order("acme") == ["late"]


async def test_a_batch_job_whose_parents_are_done_holds_at_once(batches: Store) -> None:
    """With every parent completed already, the batch job enters the holding queue (and its
    limit) at enqueue."""
    await put(batches, job("parent"))
    await claim(batches)
    await batches.report(OWNER, [Outcome("parent", State.COMPLETED)], T0)
    await batches.enqueue_dependent(
        [DependentJob(batch(f"b{i}"), ("parent",)) for i in range(5)], T0
    )
    assert await batches.usage("acme") == (3, 2)
    with pytest.raises(LimitExceeded):
        await batches.enqueue_dependent([DependentJob(batch("b5"), ("parent",))], T0)
    with pytest.raises(JobNotFound):
        await batches.get("b5")
