"""Jobs that wait for other jobs: dependencies, fan-in and fan-out, chains."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import flexq
from flexq import JobNotFound, State
from flexq._store import sqlite as store_sql
from flexq._store.memory import MemoryStore
from flexq.abc import DependentJob, Outcome, Store
from tests.conftest import make_queue
from tests.test_store_conformance import OWNER, T0, TASKS, job, put

if TYPE_CHECKING:
    from pathlib import Path

# -- the store ------------------------------------------------------------------------------


async def complete(store: Store, *job_ids: str, state: State = State.COMPLETED) -> None:
    """Claim the jobs and report them ended in ``state``."""
    wanted = set(job_ids)
    while wanted:
        claimed = await store.claim(OWNER, {"acme": len(wanted)}, TASKS, T0, T0 + 10)
        taken = [c.id for c in claimed if c.id in wanted]
        assert taken, f"none of {sorted(wanted)} could be claimed"
        await store.report(OWNER, [Outcome(i, state) for i in taken], T0)
        wanted -= set(taken)


async def test_a_job_waits_until_every_parent_completed(store: Store) -> None:
    """WAITING while a parent runs; QUEUED in the report that completes the last parent."""
    await put(store, job("a"), job("b"))
    await store.enqueue_dependent([DependentJob(job("c"), ("a", "b"))], T0)
    assert (await store.get("c")).state is State.WAITING
    assert await store.waiting_for("c") == ["a", "b"]
    await complete(store, "a")
    assert (await store.get("c")).state is State.WAITING
    assert await store.waiting_for("c") == ["b"]
    await complete(store, "b")
    assert (await store.get("c")).state is State.QUEUED
    assert await store.waiting_for("c") == []


async def test_a_released_job_with_a_later_run_at_is_scheduled(store: Store) -> None:
    """not-before: a dependant released before its run_at waits for that time as SCHEDULED."""
    await put(store, job("a"))
    await store.enqueue_dependent([DependentJob(job("c", run_at=T0 + 60), ("a",))], T0)
    await complete(store, "a")
    assert (await store.get("c")).state is State.SCHEDULED
    assert (await store.promote(T0 + 60))[0] == ["acme"]


@pytest.mark.parametrize("ending", [State.FAILED, State.ABORTED])
async def test_a_failed_parent_aborts_its_dependants_down_the_line(
    store: Store, ending: State
) -> None:
    """The dependant and its own dependants end ABORTED, naming the parent that failed."""
    await put(store, job("a"), job("b"))
    await store.enqueue_dependent(
        [DependentJob(job("c"), ("a", "b")), DependentJob(job("d"), ("c",))], T0
    )
    await complete(store, "a", state=ending)
    c, d = await store.get("c"), await store.get("d")
    assert (c.state, d.state) == (State.ABORTED, State.ABORTED)
    assert c.error is not None
    assert c.error.type == "flexq.ParentFailed"
    assert f"'a', which this job depends on, ended {ending}" in c.error.message
    assert d.error is not None
    assert "'c'" in d.error.message
    assert await store.waiting_for("c") == []
    await complete(store, "b")
    assert (await store.get("c")).state is State.ABORTED


async def test_on_parent_failure_run_lets_the_dependant_run(store: Store) -> None:
    """With on_parent_failure="run" a failed parent counts as done."""
    await put(store, job("a"), job("b"))
    await store.enqueue_dependent([DependentJob(job("c"), ("a", "b"), "run")], T0)
    await complete(store, "a", state=State.FAILED)
    assert (await store.get("c")).state is State.WAITING
    await complete(store, "b")
    assert (await store.get("c")).state is State.QUEUED


async def test_aborting_or_losing_a_parent_aborts_the_dependant(store: Store) -> None:
    """An abort request and a lease that keeps expiring both end the parent, and so the child."""
    await put(store, job("a"), job("b"))
    await store.enqueue_dependent(
        [DependentJob(job("c"), ("a",)), DependentJob(job("d"), ("b",))], T0
    )
    assert await store.request_abort("a", T0) is State.ABORTED
    assert (await store.get("c")).state is State.ABORTED
    await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 10)
    recovered = await store.recover(T0 + 11, max_lease_expiries=1)
    assert recovered.failed == ["b"]
    assert (await store.get("d")).state is State.ABORTED


async def test_aborting_a_waiting_job_aborts_its_dependants(store: Store) -> None:
    """A WAITING job can be aborted; what waits on it is aborted too."""
    await put(store, job("a"))
    await store.enqueue_dependent(
        [DependentJob(job("b"), ("a",)), DependentJob(job("c"), ("b",))], T0
    )
    assert await store.request_abort("b", T0) is State.ABORTED
    assert (await store.get("c")).state is State.ABORTED
    await complete(store, "a")
    assert (await store.get("b")).state is State.ABORTED


async def test_parents_that_are_already_final(store: Store) -> None:
    """A completed parent is no wait; a failed one aborts the new job at once."""
    await put(store, job("a"), job("b"))
    await complete(store, "a")
    await complete(store, "b", state=State.FAILED)
    await store.enqueue_dependent(
        [DependentJob(job("c"), ("a",)), DependentJob(job("d"), ("a", "b"))], T0
    )
    assert (await store.get("c")).state is State.QUEUED
    d = await store.get("d")
    assert d.state is State.ABORTED
    assert d.finished_at is not None
    assert d.error is not None
    assert "'b'" in d.error.message


async def test_an_unknown_parent_is_rejected_and_nothing_is_written(store: Store) -> None:
    """JobNotFound names the missing parent; no job of the call exists afterwards."""
    await put(store, job("a"))
    with pytest.raises(JobNotFound) as caught:
        await store.enqueue_dependent(
            [DependentJob(job("b"), ("a",)), DependentJob(job("c"), ("b", "ghost"))], T0
        )
    assert caught.value.job_id == "ghost"
    assert await store.get_many(["b", "c"]) == []


async def test_fan_out_and_fan_in_of_ten_thousand(store: Store) -> None:
    """One parent releases 10,000 children at once; a job waiting on all of them is released
    by the report that completes the last one."""
    children = [f"c{n:05d}" for n in range(10_000)]
    await put(store, job("root"))
    await store.enqueue_dependent(
        [DependentJob(job(child), ("root",)) for child in children]
        + [DependentJob(job("sink", task="u"), tuple(children))],
        T0,
    )
    await complete(store, "root")
    counts = await store.counts(flexq.abc.JobFilter())
    assert counts == {State.COMPLETED: 1, State.QUEUED: 10_000, State.WAITING: 1}
    claimed = await store.claim(OWNER, {"acme": 10_000}, {"t"}, T0, T0 + 10)
    assert len(claimed) == 10_000
    await store.report(OWNER, [Outcome(c.id, State.COMPLETED) for c in claimed[:-1]], T0)
    assert await store.waiting_for("sink") == [claimed[-1].id]
    await store.report(OWNER, [Outcome(claimed[-1].id, State.COMPLETED)], T0)
    assert (await store.get("sink")).state is State.QUEUED


async def test_chain_follows_parent_ids_both_ways(store: Store) -> None:
    """chain() holds the ancestors and descendants, not unrelated jobs, oldest first."""
    await put(store, job("root"), job("other"))
    await store.enqueue_dependent(
        [
            DependentJob(job("a")._replace(parent_id="root"), ("root",)),
            DependentJob(job("b")._replace(parent_id="a"), ("a",)),
            DependentJob(job("b2")._replace(parent_id="a"), ()),
        ],
        T0,
    )
    assert [info.id for info in await store.chain("a")] == ["root", "a", "b", "b2"]
    assert [info.id for info in await store.chain("b")] == ["root", "a", "b"]
    assert [info.id for info in await store.chain("other")] == ["other"]
    with pytest.raises(JobNotFound):
        await store.chain("ghost")


# -- the queue ------------------------------------------------------------------------------


async def test_depends_on_runs_the_job_after_its_parents(queue_url: str) -> None:
    """A fan-in job runs after both parents completed; meanwhile it is WAITING."""
    queue = make_queue(queue_url)
    ran: list[str] = []

    @queue.task
    async def step(name: str) -> str:
        ran.append(name)
        return name

    async with queue:
        await queue.pause()
        a = await queue.enqueue(step, "a")
        b = await queue.enqueue(step, "b")
        c = await queue.enqueue(step, "c", depends_on=[a, b])
        assert (await queue.get(c)).state is State.WAITING
        assert await queue.waiting_for(c) == sorted([a, b])
        await queue.resume()
        info = await queue.wait(c, timeout=10)
    assert info.state is State.COMPLETED
    assert ran[-1] == "c"
    assert sorted(ran[:2]) == ["a", "b"]


async def test_enqueue_chain_passes_each_result_on(queue_url: str) -> None:
    """Each step runs after the previous one and reads its result through the context."""
    queue = make_queue(queue_url)

    @queue.task
    async def start(value: int) -> int:
        return value

    @queue.task
    async def add_one(ctx: flexq.Context) -> int:
        previous: int = await ctx.previous_result()
        return previous + 1

    async with queue:
        ids = await queue.enqueue_chain(
            [flexq.Call(start, 1), flexq.Call(add_one), flexq.Call(add_one)], tenant="acme"
        )
        last = await queue.wait(ids[-1], timeout=10)
        chain = await queue.chain(ids[1])
    assert last.result == 3
    assert [info.id for info in chain] == ids
    assert [info.parent_id for info in chain] == [None, ids[0], ids[1]]
    assert all(info.tenant == "acme" for info in chain)
    assert [info.result for info in chain] == [1, 2, 3]


async def test_a_failing_step_aborts_the_rest_of_the_chain(queue_url: str) -> None:
    """The steps after a failed one never run: they end ABORTED, naming the failed job."""
    queue = make_queue(queue_url)

    @queue.task
    async def boom() -> None:
        raise RuntimeError("boom")

    @queue.task
    async def never() -> None:
        raise AssertionError("a step after a failed one ran")

    async with queue:
        ids = await queue.enqueue_chain([flexq.Call(boom), flexq.Call(never), flexq.Call(never)])
        infos = [await queue.wait(job_id, timeout=10) for job_id in ids]
    assert [info.state for info in infos] == [State.FAILED, State.ABORTED, State.ABORTED]
    assert infos[1].error is not None
    assert ids[0] in infos[1].error.message


async def test_chain_includes_children_enqueued_from_the_context(queue_url: str) -> None:
    """Children made with ctx.enqueue are in the chain of their parent and grandchild."""
    queue = make_queue(queue_url)

    @queue.task
    async def leaf() -> None:
        pass

    @queue.task
    async def middle(ctx: flexq.Context) -> str:
        return await ctx.enqueue(leaf)

    @queue.task
    async def top(ctx: flexq.Context) -> str:
        return await ctx.enqueue(middle)

    async with queue:
        root = await queue.enqueue(top)
        middle_id = (await queue.wait(root, timeout=10)).result
        leaf_id = (await queue.wait(middle_id, timeout=10)).result
        await queue.wait(leaf_id, timeout=10)
        chain = await queue.chain(leaf_id)
    assert [info.id for info in chain] == [root, middle_id, leaf_id]


async def test_bad_dependencies_are_rejected_with_nothing_written(queue_url: str) -> None:
    """Unknown parents, a lone id, keys and unknown policies raise; nothing is enqueued."""
    queue = make_queue(queue_url)

    @queue.task
    async def step() -> None:
        pass

    async with queue:
        with pytest.raises(JobNotFound):
            await queue.enqueue(step, depends_on=["ghost"])
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(step, depends_on="ghost")
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(step, depends_on=[], key="k")
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(step, depends_on=[], on_parent_failure="maybe")  # type: ignore[arg-type]
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue_chain([flexq.Call(step), flexq.Call(step).with_options(key="k")])
        with pytest.raises(flexq.UnknownTask):
            await queue.enqueue_chain([flexq.Call(step), flexq.Call("unregistered")])
        counts = await queue.counts()
    assert sum(counts.values()) == 0


async def test_a_chain_step_can_wait_for_a_time_after_its_turn(queue_url: str) -> None:
    """A step with run_at later than its parent's end waits as SCHEDULED, then runs."""
    queue = make_queue(queue_url)

    @queue.task
    async def step() -> None:
        pass

    later = datetime.now(UTC) + timedelta(seconds=0.3)
    async with queue:
        first, second = await queue.enqueue_chain(
            [flexq.Call(step), flexq.Call(step).with_options(run_at=later)]
        )
        await queue.wait(first, timeout=10)
        info = await queue.wait(second, timeout=10)
    assert info.state is State.COMPLETED
    assert info.started_at is not None
    assert info.started_at >= later


def test_releasing_dependants_uses_indexes_only() -> None:
    """Every statement that releases or aborts dependants, or lists what a job waits for,
    seeks an index: no statement scans the jobs or the dependency edges."""
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    for statement in store_sql._SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    store = store_sql.SQLiteStore(":memory:")
    store._conn = db
    store._enqueue_dependent(
        [
            DependentJob(job("a"), ()),
            DependentJob(job("b"), ()),
            DependentJob(job("c"), ("a", "b")),
            DependentJob(job("d"), ("c",)),
            DependentJob(job("e"), ("b",)),
        ],
        T0,
    )
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    store_sql._release_dependants(db, [("a", State.FAILED)], T0)
    store_sql._release_dependants(db, [("b", State.COMPLETED)], T0)
    store._waiting_for("e")
    db.set_trace_callback(None)
    plans = [
        " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql))
        for sql in statements
        if sql.lstrip().startswith(("SELECT", "UPDATE", "DELETE"))
    ]
    assert len(plans) >= 10
    assert any("NOT EXISTS" in sql for sql in statements)
    assert all("SEARCH" in p and "SCAN" not in p for p in plans), plans


@pytest.mark.parametrize("seed", range(12))
async def test_memory_and_sqlite_agree_on_random_dependency_graphs(
    seed: int, tmp_path: Path
) -> None:
    """Random graphs and random endings of their jobs leave both stores in the same states,
    and every WAITING job waits for exactly its parents that are not final."""
    rng = random.Random(seed)
    stores: list[Store] = [MemoryStore(), store_sql.SQLiteStore(str(tmp_path / "f.db"))]
    for each in stores:
        await each.open()
    parents: dict[str, tuple[str, ...]] = {}
    policies: dict[str, str] = {}
    try:
        for step in range(60):
            op = rng.choice(["enqueue", "enqueue", "claim", "end", "end", "abort", "recover"])
            now = T0 + step
            if op == "enqueue":
                new = f"j{step:03d}"
                chosen = tuple(rng.sample(sorted(parents), min(len(parents), rng.randint(0, 3))))
                policy = rng.choice(["abort", "abort", "run"])
                parents[new], policies[new] = chosen, policy
                dependent = DependentJob(job(new, run_at=now), chosen, policy)  # type: ignore[arg-type]
                for each in stores:
                    await each.enqueue_dependent([dependent], now)
            elif op == "claim":
                claimed = [
                    sorted(c.id for c in await each.claim(OWNER, {"acme": 2}, TASKS, now, now + 5))
                    for each in stores
                ]
                assert claimed[0] == claimed[1]
            elif op in ("end", "abort"):
                infos = await stores[0].get_many(sorted(parents))
                if op == "end":
                    running = [i.id for i in infos if i.state is State.PROCESSING]
                    if running:
                        target = rng.choice(running)
                        ending = rng.choice([State.COMPLETED, State.FAILED, State.ABORTED])
                        for each in stores:
                            await each.report(OWNER, [Outcome(target, ending)], now)
                else:
                    waiting = [i.id for i in infos if i.state in (State.WAITING, State.QUEUED)]
                    if waiting:
                        target = rng.choice(waiting)
                        for each in stores:
                            await each.request_abort(target, now)
            else:
                for each in stores:
                    await each.recover(now, max_lease_expiries=1)
            views = []
            for each in stores:
                infos = await each.get_many(sorted(parents))
                views.append({i.id: (i.state, len(i.errors)) for i in infos})
            assert views[0] == views[1], f"step {step}: {op}"
            states = {job_id: state for job_id, (state, _) in views[0].items()}
            for job_id, state in states.items():
                unfinished = sorted(p for p in parents[job_id] if not states[p].is_final)
                if state is State.WAITING:
                    assert unfinished
                    for each in stores:
                        assert await each.waiting_for(job_id) == unfinished
                elif state in (State.QUEUED, State.PROCESSING, State.COMPLETED):
                    assert not unfinished
                    ok = {State.COMPLETED} if policies[job_id] == "abort" else set(State)
                    assert all(states[p] in ok for p in parents[job_id])
    finally:
        for each in stores:
            await each.close()


async def test_a_handler_fans_out_and_in_through_its_context(queue_url: str) -> None:
    """ctx.enqueue with depends_on: the sink waits for the branches the handler enqueued, and
    all of them are in the handler's chain."""
    queue = make_queue(queue_url)

    @queue.task
    async def square(n: int) -> int:
        return n * n

    @queue.task
    async def add_up(*branches: str) -> int:
        return sum(info.result for info in await queue.get_many(list(branches)))

    @queue.task
    async def fan_out(ctx: flexq.Context, count: int) -> str:
        branches = [await ctx.enqueue(square, n) for n in range(count)]
        return await ctx.enqueue(add_up, *branches, depends_on=branches)

    async with queue:
        root = await queue.enqueue(fan_out, 4, tenant="acme")
        sink_id = (await queue.wait(root, timeout=10)).result
        sink = await queue.wait(sink_id, timeout=10)
        chain = await queue.chain(root)
    assert (sink.state, sink.result, sink.parent_id, sink.tenant) == (
        State.COMPLETED, 0 + 1 + 4 + 9, root, "acme",
    )  # fmt: skip
    assert len(chain) == 6


async def test_explain_names_the_parents_a_job_waits_for(queue_url: str) -> None:
    """queue.explain of a WAITING job names the jobs it still depends on."""
    queue = flexq.Queue(queue_url)

    @queue.task(name="step")
    async def step() -> None: ...

    await queue.open()
    try:
        first = await queue.enqueue(step)
        second = await queue.enqueue(step)
        child = await queue.enqueue(step, depends_on=[first, second])
        explanation = await queue.explain(child)
    finally:
        await queue.close()
    assert explanation.whys == (flexq.Why.WAITING_FOR_PARENTS,)
    assert first in str(explanation)
    assert second in str(explanation)


async def test_not_before_holds_a_released_job_until_its_time(queue_url: str) -> None:
    """With depends_on and not_before, a job whose parent completed waits for the time too."""
    queue = flexq.Queue(queue_url)

    @queue.task(name="step")
    async def step() -> None: ...

    await queue.open()
    try:
        parent = await queue.enqueue(step)
        later = datetime.now(UTC) + timedelta(hours=1)
        child = await queue.enqueue(step, depends_on=[parent], not_before=later)
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue(step, run_at=later, not_before=later)
        info = await queue.get(child)
    finally:
        await queue.close()
    assert info.state is State.WAITING
    assert abs(info.run_at.timestamp() - later.timestamp()) < 0.001
