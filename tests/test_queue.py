"""The Queue as an application uses it: enqueue, run, wait, query, on every store."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import flexq
from flexq._store.base import Outcome, Renewal
from flexq._store.memory import MemoryStore
from tests.conftest import make_queue

if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from pathlib import Path

TAKE_LEASE = """
UPDATE {s}.flexq_jobs SET lease_owner = 'another-process', lease_until = {p},
    attempts = attempts + 1
WHERE id = {p}"""
"""What another process's recovery and claim of a running job leave in its row."""


async def test_enqueue_runs_the_job_and_wait_returns_its_result(queue_url: str) -> None:
    """A queueable job runs once and its JSON result is kept."""
    queue = make_queue(queue_url)

    @queue.task
    async def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    async with queue:
        job_id = await queue.enqueue(add, 2, kwargs={"b": 3}, tenant="acme")
        info = await queue.wait(job_id, timeout=10)
    assert info.state is flexq.State.COMPLETED
    assert info.result == {"sum": 5}
    assert (info.tenant, info.task, info.kind, info.attempts) == ("acme", add.name, "queueable", 1)
    assert info.args == (2,)
    assert info.kwargs == {"b": 3}
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.created_at <= info.started_at <= info.finished_at


async def test_enqueue_by_name_and_default_tenant(queue_url: str) -> None:
    """A task can be named by string; jobs without a tenant belong to "default"."""
    queue = make_queue(queue_url)

    @queue.task(name="greet")
    async def greet(name: str) -> str:
        return f"hi {name}"

    async with queue:
        info = await queue.wait(await queue.enqueue("greet", "ada"), timeout=10)
    assert (info.result, info.tenant, info.task) == ("hi ada", "default", "greet")


async def test_future_jobs_keep_no_result(queue_url: str) -> None:
    """A future (fire-and-forget) job completes with result None."""
    queue = make_queue(queue_url)

    @queue.task(kind="future")
    async def fire() -> str:
        return "ignored"

    async with queue:
        info = await queue.wait(await queue.enqueue(fire), timeout=10)
    assert (info.state, info.kind, info.result) == (flexq.State.COMPLETED, flexq.Kind.FUTURE, None)


async def test_priority_then_future_before_queueable_then_fifo(queue_url: str) -> None:
    """With one worker, jobs start by priority, then future before queueable, then age."""
    queue = make_queue(queue_url, workers=1)
    order: list[str] = []
    all_ran = anyio.Event()

    @queue.task
    async def q(label: str) -> None:
        order.append(label)
        if len(order) == 5:
            all_ran.set()

    @queue.task(kind="future")
    async def f(label: str) -> None:
        await q.fn(label)

    await queue.open()
    for call in [(q, "q1"), (f, "f1"), (q, "q2"), (f, "f2")]:
        await queue.enqueue(*call)
    await queue.enqueue(q, "urgent", priority=9)
    await queue.close()
    async with queue:
        with anyio.fail_after(10):
            await all_ran.wait()
    assert order == ["urgent", "f1", "f2", "q1", "q2"]


async def test_delayed_job_is_scheduled_until_its_time(queue_url: str) -> None:
    """A delayed job is visible as SCHEDULED with its run_at, then runs after it."""
    queue = make_queue(queue_url)

    @queue.task
    async def later() -> float:
        return anyio.current_time()

    async with queue:
        job_id = await queue.enqueue(later, delay=0.3)
        info = await queue.get(job_id)
        assert info.state is flexq.State.SCHEDULED
        assert info.run_at > info.created_at
        done = await queue.wait(job_id, timeout=10)
    assert done.state is flexq.State.COMPLETED
    assert done.started_at is not None
    assert done.started_at >= info.run_at


async def test_run_at_takes_an_aware_datetime(queue_url: str) -> None:
    """run_at schedules at a wall-clock time."""
    queue = make_queue(queue_url)

    @queue.task
    async def noop() -> None:
        pass

    async with queue:
        when = datetime.now(UTC) + timedelta(seconds=0.2)
        job_id = await queue.enqueue(noop, run_at=when)
        assert (await queue.get(job_id)).run_at == datetime.fromtimestamp(when.timestamp(), UTC)
        assert (await queue.wait(job_id, timeout=10)).state is flexq.State.COMPLETED


async def test_enqueue_many_is_one_all_or_nothing_unit(queue_url: str) -> None:
    """enqueue_many writes every call or, on bad input, none."""
    queue = make_queue(queue_url)

    @queue.task
    async def square(n: int) -> int:
        return n * n

    async with queue:
        ids = await queue.enqueue_many(
            [flexq.Call(square, n) for n in range(20)]
            + [flexq.Call(square, 7).with_options(tenant="other", priority=3)],
            tenant="acme",
        )
        infos = [await queue.wait(i, timeout=10) for i in ids]
        assert [i.result for i in infos] == [n * n for n in range(20)] + [49]
        assert infos[-1].tenant == "other"
        assert infos[-1].priority == 3
        before = await queue.counts()
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue_many([flexq.Call(square, 1), flexq.Call(square, object())])
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue_many([flexq.Call(square, 1), flexq.Call(square, 1, 2)])
        assert await queue.counts() == before
        assert await queue.enqueue_many([]) == []


async def test_bad_input_is_rejected_before_anything_is_written(queue_url: str) -> None:
    """Every kind of bad enqueue raises a clear FlexqError and stores nothing."""
    queue = make_queue(queue_url)
    other = make_queue("memory://")

    @queue.task
    async def work(n: int) -> None:
        pass

    @other.task(name=work.name)
    async def impostor(n: int) -> None:
        pass

    await queue.open()
    try:
        cases: list[tuple[type[Exception], Any, tuple[Any, ...], dict[str, Any]]] = [
            (flexq.UnknownTask, "nope", (1,), {}),
            (flexq.UnknownTask, impostor, (1,), {}),
            (flexq.InvalidArguments, work, (object(),), {}),
            (flexq.InvalidArguments, work, (math.nan,), {}),
            (flexq.InvalidArguments, work, (), {}),
            (flexq.InvalidArguments, work, (1, 2), {}),
            (flexq.InvalidArguments, work, (1,), {"tenant": ""}),
            (flexq.InvalidArguments, work, (1,), {"priority": "high"}),
            (flexq.InvalidArguments, work, (1,), {"priority": True}),
            (flexq.InvalidArguments, work, (1,), {"delay": -1}),
            (flexq.InvalidArguments, work, (1,), {"delay": math.inf}),
            (flexq.InvalidArguments, work, (1,), {"run_at": datetime(2030, 1, 1)}),
            (flexq.InvalidArguments, work, (1,), {"delay": 1, "run_at": datetime.now(UTC)}),
            (flexq.InvalidArguments, work, (1,), {"key": ""}),
            (flexq.InvalidArguments, work, (1,), {"on_duplicate": "ignore"}),
        ]
        for error, task, args, options in cases:
            with pytest.raises(error):
                await queue.enqueue(task, *args, **options)
        assert sum((await queue.counts()).values()) == 0
    finally:
        await queue.close()
    with pytest.raises(flexq.QueueClosed):
        await queue.enqueue(work, 1)


def test_task_registration_rejects_bad_handlers_and_options() -> None:
    """Only async functions with sane options register, each name once."""
    queue = flexq.Queue("memory://")

    def sync() -> None:
        pass

    async def handler() -> None:
        pass

    with pytest.raises(flexq.InvalidArguments, match="async"):
        queue.task(sync)  # type: ignore[arg-type]
    bad_options: list[dict[str, Any]] = [
        {"retries": -1}, {"timeout": 0}, {"kind": "batch"}, {"kind": "nope"},
        {"priority": 2**40}, {"name": ""},
    ]  # fmt: skip
    for options in bad_options:
        with pytest.raises(flexq.InvalidArguments):
            queue.task(**options)(handler)
    queue.task(name="h")(handler)
    with pytest.raises(flexq.InvalidArguments, match="already registered"):
        queue.task(name="h")(handler)


def test_queue_options_are_validated() -> None:
    """Nonsense configuration fails when the queue is made, not later."""
    bad_options: list[dict[str, Any]] = [
        {"workers": 0}, {"lease": 0}, {"poll_interval": -1}, {"max_loop_lag": 0},
        {"weights": {"a": 0}}, {"max_lease_expiries": 0},
    ]  # fmt: skip
    for options in bad_options:
        with pytest.raises(flexq.InvalidArguments):
            flexq.Queue("memory://", **options)
    with pytest.raises(flexq.InvalidArguments):
        flexq.Queue("redis://localhost")
    with pytest.raises(flexq.InvalidArguments):
        flexq.Queue("sqlite:///x.db?synchronous=sometimes")


async def test_retries_back_off_and_keep_every_error(queue_url: str) -> None:
    """A failing job is retried `retries` times, each error kept, then ends FAILED."""
    queue = make_queue(queue_url)

    @queue.task(retries=2)
    async def flaky(ctx: flexq.Context) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    async with queue:
        info = await queue.wait(await queue.enqueue(flaky), timeout=10)
    assert info.state is flexq.State.FAILED
    assert (info.attempts, info.max_attempts) == (3, 3)
    assert [(e.type, e.message, e.attempt) for e in info.errors] == [
        ("builtins.ValueError", f"attempt {n}", n) for n in (1, 2, 3)
    ]
    assert info.error is not None
    assert "ValueError" in info.error.traceback
    assert queue.statistics().failed == 1


async def test_a_retry_that_succeeds_completes(queue_url: str) -> None:
    """After failures, a successful attempt completes the job with the earlier errors kept."""
    queue = make_queue(queue_url)

    @queue.task(retries=3)
    async def second_time_lucky(ctx: flexq.Context) -> int:
        if ctx.attempt < 2:
            raise RuntimeError("transient")
        return ctx.attempt

    async with queue:
        info = await queue.wait(await queue.enqueue(second_time_lucky), timeout=10)
    assert (info.state, info.result, len(info.errors)) == (flexq.State.COMPLETED, 2, 1)


async def test_timeout_cancels_the_attempt_and_counts_as_failure(queue_url: str) -> None:
    """An attempt over its timeout is cancelled and recorded as flexq.JobTimeout."""
    queue = make_queue(queue_url)
    cancelled = []

    @queue.task(timeout=0.05, retries=1)
    async def slow() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    async with queue:
        info = await queue.wait(await queue.enqueue(slow), timeout=10)
    assert info.state is flexq.State.FAILED
    assert [e.type for e in info.errors] == ["flexq.JobTimeout", "flexq.JobTimeout"]
    assert cancelled == [True, True]


async def test_non_json_result_fails_the_attempt(queue_url: str) -> None:
    """A result that is not JSON is an error of the attempt, not a crash of the worker."""
    queue = make_queue(queue_url)

    @queue.task
    async def bad() -> object:
        return object()

    async with queue:
        info = await queue.wait(await queue.enqueue(bad), timeout=10)
    assert info.state is flexq.State.FAILED
    assert info.error is not None
    assert info.error.type == "flexq.InvalidArguments"


async def test_context_gives_identity_children_and_progress(queue_url: str) -> None:
    """A handler's context knows its job and can chain children and report progress."""
    queue = make_queue(queue_url)
    seen: dict[str, Any] = {}

    @queue.task
    async def child(n: int) -> int:
        return n + 1

    @queue.task
    async def parent(ctx: flexq.Context, n: int) -> str:
        seen.update(job_id=ctx.job_id, tenant=ctx.tenant, attempt=ctx.attempt, task=ctx.task)
        await ctx.set_progress({"step": 1})
        return await ctx.enqueue(child, n)

    async with queue:
        parent_id = await queue.enqueue(parent, 41, tenant="acme")
        info = await queue.wait(parent_id, timeout=10)
        child_info = await queue.wait(info.result, timeout=10)
    assert seen == {"job_id": parent_id, "tenant": "acme", "attempt": 1, "task": parent.name}
    assert info.progress == {"step": 1}
    assert (child_info.parent_id, child_info.tenant, child_info.result) == (parent_id, "acme", 42)


async def test_keyword_only_context_and_kwargs(queue_url: str) -> None:
    """The context can be a keyword-only parameter and arguments can be keywords."""
    queue = make_queue(queue_url)

    @queue.task
    async def greet(name: str, *, punctuation: str = "!", ctx: flexq.Context) -> str:
        return f"{ctx.tenant}: hi {name}{punctuation}"

    async with queue:
        info = await queue.wait(
            await queue.enqueue(greet, "ada", kwargs={"punctuation": "?"}), timeout=10
        )
    assert info.result == "default: hi ada?"


async def test_duplicate_key_raises_or_returns_existing(queue_url: str) -> None:
    """A key is unique per tenant while its job is unfinished; DuplicateJob names the job."""
    queue = make_queue(queue_url)

    @queue.task
    async def invoice(n: int) -> None:
        pass

    await queue.open()
    try:
        first = await queue.enqueue(invoice, 1, tenant="acme", key="inv-1")
        with pytest.raises(flexq.DuplicateJob) as caught:
            await queue.enqueue(invoice, 1, tenant="acme", key="inv-1")
        assert caught.value.existing_id == first
        assert await queue.enqueue(invoice, 1, tenant="acme", key="inv-1",
                                   on_duplicate="return") == first  # fmt: skip
        assert await queue.enqueue(invoice, 1, tenant="other", key="inv-1") != first
        assert (await queue.counts(tenant="acme"))[flexq.State.QUEUED] == 1
        twins = [flexq.Call(invoice, n).with_options(key="same") for n in (1, 2)]
        with pytest.raises(flexq.InvalidArguments):
            await queue.enqueue_many(twins)
        first_twin, second_twin = await queue.enqueue_many(twins, on_duplicate="return")
        assert first_twin == second_twin
    finally:
        await queue.close()


async def test_concurrent_enqueues_with_one_key_have_one_winner(queue_url: str) -> None:
    """Of many concurrent enqueues with the same key, exactly one writes a job."""
    queue = make_queue(queue_url)
    outcomes: list[str] = []

    @queue.task
    async def once() -> None:
        pass

    async def attempt() -> None:
        try:
            await queue.enqueue(once, key="only-one")
            outcomes.append("won")
        except flexq.DuplicateJob:
            outcomes.append("duplicate")

    await queue.open()
    try:
        async with anyio.create_task_group() as group:
            for _ in range(25):
                group.start_soon(attempt)
        assert sorted(outcomes) == ["duplicate"] * 24 + ["won"]
        assert sum((await queue.counts()).values()) == 1
    finally:
        await queue.close()


async def test_wait_times_out_and_unknown_jobs_raise(queue_url: str) -> None:
    """wait() gives up with WaitTimeout; get() and wait() of unknown ids raise JobNotFound."""
    queue = make_queue(queue_url)

    @queue.task
    async def never() -> None:
        pass

    await queue.open()
    try:
        job_id = await queue.enqueue(never)
        with pytest.raises(flexq.WaitTimeout):
            await queue.wait(job_id, timeout=0.1)
        with pytest.raises(flexq.JobNotFound):
            await queue.get("missing")
        with pytest.raises(flexq.JobNotFound):
            await queue.wait("missing", timeout=1)
    finally:
        await queue.close()


async def test_jobs_query_filters_and_pages_with_cursor(queue_url: str) -> None:
    """jobs() pages through matches in creation order; counts() covers every state."""
    queue = make_queue(queue_url)

    @queue.task
    async def a() -> None:
        pass

    @queue.task(kind="future")
    async def b() -> None:
        pass

    await queue.open()
    try:
        ids = [await queue.enqueue(a, tenant="acme") for _ in range(7)]
        await queue.enqueue(b, tenant="acme")
        await queue.enqueue(a, tenant="other")
        seen: list[str] = []
        cursor = None
        while True:
            page = await queue.jobs(tenant="acme", task=a, limit=3, cursor=cursor)
            seen.extend(info.id for info in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == ids
        assert [i.id for i in (await queue.jobs(tenant="acme", offset=5, limit=2)).items] == ids[5:]
        futures = await queue.jobs(kind="future")
        assert [i.task for i in futures.items] == [b.name]
        assert (await queue.jobs(state="COMPLETED")).items == ()
        picked = await queue.get_many([ids[3], "missing", ids[1], ids[3]])
        assert [info.id for info in picked] == [ids[3], ids[1]]
        counts = await queue.counts(tenant="acme")
        assert set(counts) == set(flexq.State)
        assert counts[flexq.State.QUEUED] == 8
        recent = await queue.jobs(created_after=datetime.now(UTC) - timedelta(minutes=1))
        assert len(recent.items) == 9
        for bad in [{"limit": 0}, {"limit": 5000}, {"cursor": "abc"}, {"state": "DONE"},
                    {"created_after": datetime(2020, 1, 1)}]:  # fmt: skip
            with pytest.raises(flexq.InvalidArguments):
                await queue.jobs(**bad)  # type: ignore[arg-type]
    finally:
        await queue.close()


async def test_lease_is_renewed_while_a_long_job_runs(queue_url: str) -> None:
    """A job that outlives several leases is not taken away or run twice."""
    queue = make_queue(queue_url, lease=0.3)
    runs = []

    @queue.task
    async def long() -> None:
        runs.append(1)
        await anyio.sleep(1.2)

    async with queue:
        info = await queue.wait(await queue.enqueue(long), timeout=10)
    assert (info.state, info.attempts, runs) == (flexq.State.COMPLETED, 1, [1])


async def check_a_job_whose_lease_is_taken_is_stopped(
    url: str, take: Callable[[str], None]
) -> None:
    """A queue runs a long job and ``take(job_id)`` gives its lease to another process in the
    database: within about a renewal the handler is cancelled, the queue writes nothing for
    the job, and it goes on running later jobs."""
    queue = make_queue(url, lease=1.0)
    started, stopped = anyio.Event(), anyio.Event()
    ends: list[str] = []

    @queue.task(name="long")
    async def long() -> None:
        started.set()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            ends.append("stopped")
            stopped.set()
            raise
        ends.append("done")

    @queue.task(name="quick")
    async def quick() -> str:
        return "ran"

    async with queue:
        job_id = await queue.enqueue(long)
        await started.wait()
        take(job_id)
        with anyio.fail_after(1.0):  # the lease is renewed every third of it
            await stopped.wait()
        later = await queue.wait(await queue.enqueue(quick), timeout=10)
        taken = await queue.get(job_id)
    assert ends == ["stopped"]
    assert (later.state, later.result) == (flexq.State.COMPLETED, "ran")
    assert (taken.state, taken.attempts, taken.finished_at) == (flexq.State.PROCESSING, 2, None)
    assert queue.statistics().completed == 1


async def test_a_job_whose_lease_another_process_took_is_stopped_not_finished(
    sqlite_url: str,
) -> None:
    """SQLite: a job that another process took over while this one ran it (its lease had
    expired by the other's clock) is stopped here, not run to its end."""

    def take(job_id: str) -> None:
        path = sqlite_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(TAKE_LEASE.format(s="main", p="?"), (time.time() + 60, job_id))

    await check_a_job_whose_lease_is_taken_is_stopped(sqlite_url, take)


class LeaseLostDuringRenewal(MemoryStore):
    """A store whose next renewal of ``take`` first hands the job back to the queue (as a
    recovery would), and answers only once ``claimed_again`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.take: str | None = None
        self.claimed_again = anyio.Event()

    async def renew(self, owner: str, job_ids: Collection[str], lease_until: float) -> Renewal:
        if self.take is None or self.take not in job_ids:
            return await super().renew(owner, job_ids, lease_until)
        released = Outcome(self.take, flexq.State.QUEUED, release=True)
        self.take = None
        await self.report(owner, [released], time.time())
        renewal = await super().renew(owner, job_ids, lease_until)
        await self.claimed_again.wait()
        return renewal


async def test_a_renewal_that_lost_a_job_spares_the_attempt_claimed_since() -> None:
    """A job lost while a renewal runs and claimed again by the same queue before the renewal
    answers: the new attempt is not stopped, and the job completes once, without a lease
    expiry."""
    store = LeaseLostDuringRenewal()
    queue = make_queue(store, lease=1.0)
    starts: list[str] = []

    @queue.task(name="job")
    async def job() -> None:
        starts.append("start")
        if len(starts) == 1:
            await anyio.sleep_forever()
        store.claimed_again.set()
        await anyio.sleep(0.5)

    async with queue:
        job_id = await queue.enqueue(job)
        store.take = job_id
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.attempts, info.errors) == (flexq.State.COMPLETED, 1, ())
    assert starts == ["start", "start"]


async def test_finished_jobs_are_pruned_after_retention(queue_url: str) -> None:
    """Final jobs disappear after the retention period; unfinished ones stay."""
    queue = make_queue(queue_url, retention=0.2, prune_interval=0.1)

    @queue.task
    async def quick() -> None:
        pass

    async with queue:
        done = await queue.enqueue(quick)
        await queue.wait(done, timeout=10)
        waiting = await queue.enqueue(quick, delay=60)
        with anyio.fail_after(5):
            while True:
                try:
                    await queue.get(done)
                except flexq.JobNotFound:
                    break
                await anyio.sleep(0.05)
        assert (await queue.get(waiting)).state is flexq.State.SCHEDULED


async def test_statistics_count_what_happened(queue_url: str) -> None:
    """statistics() reports workers and outcome counters of this process."""
    queue = make_queue(queue_url, workers=3)

    @queue.task
    async def ok() -> None:
        pass

    assert queue.statistics().running == 0
    async with queue:
        for job_id in [await queue.enqueue(ok) for _ in range(5)]:
            await queue.wait(job_id, timeout=10)
        stats = queue.statistics()
    assert (stats.workers, stats.claimed, stats.completed, stats.failed) == (3, 5, 5, 0)


async def test_store_failures_surface_as_store_error(tmp_path: Path) -> None:
    """A database that cannot be opened or written raises StoreError, a FlexqError."""
    missing_dir = make_queue(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'q.db'}")
    with pytest.raises(flexq.StoreError) as caught:
        await missing_dir.open()
    assert caught.value.__cause__ is not None
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is not SQLite" * 512)
    with pytest.raises(flexq.StoreError):
        await make_queue(f"sqlite:///{not_a_database}").open()


async def test_oversized_or_too_deep_arguments_are_refused(queue_url: str) -> None:
    """Arguments past the size limit, or nested past what JSON can encode, raise
    InvalidArguments and write nothing."""
    from flexq._queue import MAX_ARGUMENTS_BYTES

    queue = make_queue(queue_url)

    @queue.task
    async def take(data: object) -> None: ...

    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    await queue.open()
    try:
        with pytest.raises(flexq.InvalidArguments, match="more than"):
            await queue.enqueue(take, "x" * MAX_ARGUMENTS_BYTES)
        with pytest.raises(flexq.InvalidArguments, match="nested too deeply"):
            await queue.enqueue(take, deep)
        assert sum((await queue.counts()).values()) == 0
        assert await queue.enqueue(take, "x" * (MAX_ARGUMENTS_BYTES - 100))
    finally:
        await queue.close()
