"""The batch part of the store contract, the same on every store: chunks, checkpoints, counts,
the facts ``explain`` reads."""

from __future__ import annotations

import pytest

from flexq import JobNotFound, Kind, Limits, PauseScope, State
from flexq._limits import LimitTable
from flexq._serialize import dumps
from flexq._store.base import ChunkDone, EnqueueUnit, NewJob, Placement, error_record
from flexq.abc import Outcome, Store

T0 = 1_700_000_000.0
OWNER = "worker-a"
TASKS = {"t", "b"}


def job(job_id: str, *, tenant: str = "acme", kind: Kind = Kind.BATCH, task: str = "b") -> NewJob:
    return NewJob(
        id=job_id, task=task, kind=kind, tenant=tenant, priority=0, args="[]", kwargs="{}",
        max_attempts=3, timeout=None, run_at=T0, key=None, parent_id=None,
    )  # fmt: skip


async def put(store: Store, *jobs: NewJob) -> None:
    (result,) = await store.enqueue([EnqueueUnit(jobs, "raise")], T0)
    assert isinstance(result, list), result


async def claimed_batch(store: Store, job_id: str = "j") -> None:
    """A batch job claimed by OWNER (PREPARING)."""
    await put(store, job(job_id))
    (claimed,) = await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 60)
    assert (claimed.id, claimed.kind) == (job_id, Kind.BATCH)
    assert (await store.get(job_id)).state is State.PREPARING


def chunk_error(message: str) -> str:
    return dumps(error_record("builtins.ValueError", message, "tb", 2, T0), "error")


async def test_start_commits_its_chunks_and_checkpoints_count_each_chunk_once(
    store: Store,
) -> None:
    """Chunks are stored as start yields them; end_preparing moves the job to PROCESSING;
    checkpoints add each chunk to the counts once, a repeated one no more."""
    await claimed_batch(store)
    counts = await store.begin_batch(OWNER, "j")
    assert counts is not None
    assert not counts.prepared
    assert await store.add_chunks(OWNER, "j", 0, [(2, "[1,2]"), (2, "[3,4]")])
    assert await store.add_chunks(OWNER, "j", 2, [(1, "[5]")])
    assert (await store.get("j")).state is State.PREPARING
    assert await store.end_preparing(OWNER, "j", 5, 3)
    info = await store.get("j")
    assert info.state is State.PROCESSING
    assert info.progress.total_items == 5
    assert info.progress.chunks_total == 3
    assert await store.pending_chunks("j", -1, 2) == [(0, "[1,2]"), (1, "[3,4]")]
    assert await store.pending_chunks("j", 1, 10) == [(2, "[5]")]
    assert await store.checkpoint(OWNER, "j", [ChunkDone(0, 2), ChunkDone(2, 1, chunk_error("x"))])
    assert await store.checkpoint(OWNER, "j", [ChunkDone(0, 2)])  # already counted
    assert await store.pending_chunks("j", -1, 10) == [(1, "[3,4]")]
    counts, errors = await store.batch_summary("j")
    assert (counts.items_processed, counts.chunks_succeeded, counts.chunks_failed) == (3, 1, 1)
    assert (counts.total_items, counts.chunks_total, counts.prepared) == (5, 3, True)
    assert errors == [(2, chunk_error("x"))]
    progress = (await store.get("j")).progress
    assert (progress.items_processed, progress.errors) == (3, 1)


async def test_a_new_attempt_resumes_a_prepared_batch_or_drops_an_unfinished_start(
    store: Store,
) -> None:
    """begin_batch of a prepared batch keeps its chunks and moves it to PROCESSING; of one
    whose start did not commit, drops the chunks that start left."""
    await put(store, job("done"), job("half"))
    await store.claim(OWNER, {"acme": 2}, TASKS, T0, T0 + 60)
    for job_id in ("done", "half"):
        await store.begin_batch(OWNER, job_id)
        await store.add_chunks(OWNER, job_id, 0, [(1, "[1]"), (1, "[2]")])
    await store.end_preparing(OWNER, "done", 2, 2)
    await store.checkpoint(OWNER, "done", [ChunkDone(0, 1)])
    # Both go back to the queue (a shutdown) and are claimed again.
    await store.report(
        OWNER,
        [Outcome("done", State.QUEUED, release=True), Outcome("half", State.QUEUED, release=True)],
        T0,
    )
    assert {i.state for i in await store.get_many(["done", "half"])} == {State.QUEUED}
    await store.claim(OWNER, {"acme": 2}, TASKS, T0, T0 + 60)
    resumed = await store.begin_batch(OWNER, "done")
    assert resumed is not None
    assert (resumed.prepared, resumed.items_processed, resumed.chunks_total) == (True, 1, 2)
    assert (await store.get("done")).state is State.PROCESSING
    assert await store.pending_chunks("done", -1, 10) == [(1, "[2]")]
    restarted = await store.begin_batch(OWNER, "half")
    assert restarted is not None
    assert not restarted.prepared
    assert await store.pending_chunks("half", -1, 10) == []
    assert (await store.get("half")).state is State.PREPARING


async def test_only_the_owner_writes_a_batch(store: Store) -> None:
    """Another owner's begin_batch, add_chunks, end_preparing and checkpoint write nothing."""
    await claimed_batch(store)
    assert await store.begin_batch("intruder", "j") is None
    assert not await store.add_chunks("intruder", "j", 0, [(1, "[1]")])
    assert not await store.end_preparing("intruder", "j", 1, 1)
    assert not await store.checkpoint("intruder", "j", [ChunkDone(0, 1)])
    assert await store.pending_chunks("j", -1, 10) == []
    assert (await store.get("j")).state is State.PREPARING


async def test_wait_facts_of_a_holding_job(store: Store) -> None:
    """A holding job's facts: its 0-based place, the tenant's holding and active counts."""
    store.set_limits(LimitTable(Limits(max_active_batches=1)))
    await put(store, job("a"), job("b"), job("c"), job("other", tenant="zeta"))
    await store.reorder("c", Placement("front"))
    await store.set_pause(PauseScope.TENANT, "acme", True, T0)
    facts = await store.wait_facts("b")
    assert (facts.info.state, facts.holding_position, facts.holding) == (State.HOLDING, 1, 2)
    assert facts.active_batches == 1
    assert [(p.scope, p.name) for p in facts.pauses] == [(PauseScope.TENANT, "acme")]
    queued = await store.wait_facts("a")
    assert (queued.info.state, queued.holding_position) == (State.QUEUED, None)


async def test_wait_facts_of_a_queued_job_count_ready_jobs_ahead(store: Store) -> None:
    """ready_ahead counts the tenant's QUEUED jobs that run first; tenants_ahead the other
    tenants with QUEUED jobs; a suspect (its worker died) runs alone and counts in neither."""
    plain = Kind.QUEUEABLE
    await put(store, job("dies", kind=plain, task="t"), job("z1", tenant="zeta", kind=plain))
    await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 1)
    recovered = await store.recover(T0 + 2, 3)
    assert recovered.requeued == ["dies"]
    await put(store, job("a1", kind=plain, task="t"), job("a2", kind=plain, task="t"))
    await put(store, job("y1", tenant="yak", kind=plain, task="t"))
    facts = await store.wait_facts("a2")
    assert (facts.ready_ahead, facts.tenants_ahead) == (1, 2)
    first = await store.wait_facts("a1")
    assert (first.ready_ahead, first.tenants_ahead) == (0, 2)


async def test_wait_facts_of_an_unknown_job(store: Store) -> None:
    """wait_facts raises JobNotFound for an unknown id."""
    with pytest.raises(JobNotFound):
        await store.wait_facts("nope")


async def test_a_lost_batch_keeps_its_slot_until_it_fails_for_good(store: Store) -> None:
    """A batch whose worker died goes back to QUEUED holding its slot; once its lease expired
    max_lease_expiries times it FAILS and the tenant's first holding job is admitted."""
    store.set_limits(LimitTable(Limits(max_active_batches=1)))
    await put(store, job("lost"), job("next"), job("last"))
    await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 1)
    requeued = await store.recover(T0 + 2, 2)
    assert requeued.requeued == ["lost"]
    assert await store.usage("acme") == (2, 1)
    assert await store.holding_order("acme") == ["next", "last"]
    claimed = await store.claim_suspect(OWNER, TASKS, T0 + 3, T0 + 4)
    assert claimed is not None
    assert claimed.id == "lost"
    failed = await store.recover(T0 + 5, 2)
    assert failed.failed == ["lost"]
    assert (await store.get("lost")).state is State.FAILED
    assert (await store.get("next")).state is State.QUEUED
    assert await store.holding_order("acme") == ["last"]
    assert await store.usage("acme") == (1, 1)


async def test_admit_fills_slots_that_limits_now_allow(store: Store) -> None:
    """admit() moves holding jobs into slots that new limits opened, first in flex order."""
    store.set_limits(LimitTable(Limits(max_active_batches=0)))
    await put(store, job("a"), job("b"), job("c"), job("z", tenant="zeta"))
    await store.reorder("c", Placement("front"))
    assert await store.admit(T0) == []
    store.set_limits(LimitTable(Limits(max_active_batches=2)))
    assert await store.admit(T0) == ["acme", "zeta"]
    assert await store.holding_order("acme") == ["b"]
    queued = {i.id for i in await store.get_many(["a", "b", "c", "z"]) if i.state == "QUEUED"}
    assert queued == {"c", "a", "z"}
    assert await store.admit(T0) == []
