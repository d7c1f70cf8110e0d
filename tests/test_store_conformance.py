"""One suite for every store: the same behaviour from memory, SQLite (and later PostgreSQL)."""

from __future__ import annotations

import pytest

from flexq import (
    DuplicateJob,
    IllegalTransition,
    InvalidArguments,
    JobNotFound,
    Kind,
    PauseScope,
    State,
)
from flexq.abc import EnqueueUnit, JobFilter, NewJob, Outcome, Renewal, Store

T0 = 1_700_000_000.0
OWNER = "worker-a"
TASKS = {"t", "u"}


def job(
    job_id: str,
    *,
    tenant: str = "acme",
    task: str = "t",
    priority: int = 0,
    kind: Kind = Kind.QUEUEABLE,
    run_at: float = T0,
    key: str | None = None,
    max_attempts: int = 3,
) -> NewJob:
    return NewJob(
        id=job_id, task=task, kind=kind, tenant=tenant, priority=priority, args="[1]",
        kwargs="{}", max_attempts=max_attempts, timeout=None, run_at=run_at, key=key,
        parent_id=None,
    )  # fmt: skip


async def put(store: Store, *jobs: NewJob, on_duplicate: str = "raise") -> list[str]:
    (result,) = await store.enqueue([EnqueueUnit(jobs, on_duplicate)], T0)  # type: ignore[arg-type]
    assert isinstance(result, list)
    return result


async def claim(store: Store, tenant: str = "acme", n: int = 10, now: float = T0) -> list[str]:
    claimed = await store.claim(OWNER, {tenant: n}, TASKS, now, now + 10)
    return [c.id for c in sorted(claimed, key=lambda c: c.order)]


async def test_enqueued_job_is_queued_with_its_fields(store: Store) -> None:
    """A stored job reads back with every field as given."""
    await put(store, job("a", priority=3, key="k"))
    info = await store.get("a")
    assert (info.state, info.tenant, info.task, info.priority, info.key) == (
        State.QUEUED, "acme", "t", 3, "k",
    )  # fmt: skip
    assert info.args == (1,)
    assert info.attempts == 0
    assert info.max_attempts == 3
    assert info.created_at.timestamp() == T0


async def test_get_unknown_job_raises(store: Store) -> None:
    """Asking for a job that does not exist raises JobNotFound with the id."""
    with pytest.raises(JobNotFound) as caught:
        await store.get("nope")
    assert caught.value.job_id == "nope"


async def test_future_run_at_is_scheduled_until_promoted(store: Store) -> None:
    """A job with run_at ahead is SCHEDULED and becomes QUEUED once its time comes."""
    await put(store, job("later", run_at=T0 + 5))
    assert (await store.get("later")).state is State.SCHEDULED
    assert await claim(store) == []
    assert await store.promote(T0 + 1) == ([], T0 + 5)
    assert await store.promote(T0 + 5) == (["acme"], None)
    assert await claim(store, now=T0 + 5) == ["later"]


async def test_claim_order_is_priority_then_kind_then_age(store: Store) -> None:
    """Higher priority first; at equal priority future before queueable; then FIFO."""
    await put(
        store,
        job("q1"),
        job("f1", kind=Kind.FUTURE),
        job("hi", priority=5),
        job("q2"),
        job("f2", kind=Kind.FUTURE),
    )
    assert await claim(store, n=2) == ["hi", "f1"]
    assert await claim(store, n=10) == ["f2", "q1", "q2"]


async def test_claim_takes_at_most_wanted_per_tenant(store: Store) -> None:
    """Each tenant gives up to what was asked of it, and nothing of tenants not asked."""
    await put(
        store, *(job(f"a{i}") for i in range(5)), *(job(f"b{i}", tenant="b") for i in range(5))
    )
    claimed = await store.claim(OWNER, {"acme": 2, "b": 1}, TASKS, T0, T0 + 10)
    assert sorted(c.id for c in claimed) == ["a0", "a1", "b0"]
    assert all(c.attempt == 1 for c in claimed)
    assert (await store.get("a0")).state is State.PROCESSING


async def test_claim_skips_tasks_the_worker_cannot_run(store: Store) -> None:
    """Only jobs of the tasks offered are claimed."""
    await put(store, job("x", task="other"), job("y"))
    assert await claim(store) == ["y"]
    assert (await store.get("x")).state is State.QUEUED


async def test_ready_tenants_lists_tenants_with_queued_jobs(store: Store) -> None:
    """Tenants with QUEUED work are listed once each; drained tenants are not."""
    await put(store, job("a"), job("b1", tenant="b"), job("b2", tenant="b"), job("c", tenant="c",
              run_at=T0 + 9))  # fmt: skip
    assert await store.ready_tenants(TASKS) == ["acme", "b"]
    assert await store.ready_tenants({"u"}) == []
    await claim(store)
    assert await store.ready_tenants(TASKS) == ["b"]


async def test_duplicate_key_raises_and_writes_nothing(store: Store) -> None:
    """A key held by an unfinished job rejects the whole unit; a final job frees the key."""
    await put(store, job("first", key="inv-1"))
    (result,) = await store.enqueue([EnqueueUnit([job("x"), job("dup", key="inv-1")], "raise")], T0)
    assert isinstance(result, DuplicateJob)
    assert result.existing_id == "first"
    with pytest.raises(JobNotFound):
        await store.get("x")
    assert await put(store, job("again", key="inv-1"), on_duplicate="return") == ["first"]
    assert await put(store, job("other-tenant", key="inv-1", tenant="b")) == ["other-tenant"]
    await claim(store)
    await store.report(OWNER, [Outcome("first", State.COMPLETED, result="1")], T0)
    assert await put(store, job("fresh", key="inv-1")) == ["fresh"]


async def test_duplicate_in_one_unit_of_a_group_leaves_the_others(store: Store) -> None:
    """Units in one group commit are independent: one duplicate does not undo the others."""
    await put(store, job("held", key="k"))
    results = await store.enqueue(
        [EnqueueUnit([job("ok1")], "raise"), EnqueueUnit([job("bad", key="k")], "raise"),
         EnqueueUnit([job("ok2")], "raise")],
        T0,
    )  # fmt: skip
    assert results[0] == ["ok1"]
    assert isinstance(results[1], DuplicateJob)
    assert results[2] == ["ok2"]


async def test_report_completion_and_failure(store: Store) -> None:
    """Outcomes move held jobs to their final state with result or error kept."""
    await put(store, job("ok"), job("bad"))
    await claim(store)
    error = '{"type":"builtins.ValueError","message":"no","traceback":"","attempt":1,"at":1.0}'
    written = await store.report(
        OWNER,
        [Outcome("ok", State.COMPLETED, result='{"n":1}'),
         Outcome("bad", State.FAILED, error=error)],
        T0 + 1,
    )  # fmt: skip
    assert sorted(written) == ["bad", "ok"]
    ok, bad = await store.get("ok"), await store.get("bad")
    assert (ok.state, ok.result, ok.finished_at and ok.finished_at.timestamp()) == (
        State.COMPLETED, {"n": 1}, T0 + 1,
    )  # fmt: skip
    assert bad.state is State.FAILED
    assert bad.error is not None
    assert (bad.error.type, bad.error.message) == ("builtins.ValueError", "no")


async def test_report_from_a_worker_that_lost_the_lease_is_dropped(store: Store) -> None:
    """Only the lease holder may write an outcome."""
    await put(store, job("a"))
    await claim(store)
    assert await store.report("someone-else", [Outcome("a", State.COMPLETED)], T0) == []
    assert (await store.get("a")).state is State.PROCESSING


async def test_report_rejects_illegal_transition(store: Store) -> None:
    """An outcome the transition table forbids is a bug, raised, not ignored."""
    await put(store, job("a"))
    await claim(store)
    with pytest.raises(IllegalTransition):
        await store.report(OWNER, [Outcome("a", State.HOLDING)], T0)


async def test_retry_keeps_every_error_and_waits(store: Store) -> None:
    """A retry goes back to SCHEDULED with its error appended, then runs again."""
    await put(store, job("a"))
    await claim(store)
    error = '{"type":"E","message":"one","traceback":"","attempt":1,"at":1.0}'
    await store.report(OWNER, [Outcome("a", State.SCHEDULED, error=error, run_at=T0 + 2)], T0)
    info = await store.get("a")
    assert (info.state, info.attempts, len(info.errors)) == (State.SCHEDULED, 1, 1)
    await store.promote(T0 + 2)
    assert await claim(store, now=T0 + 2) == ["a"]
    assert (await store.get("a")).attempts == 2


async def test_release_returns_job_without_counting_the_attempt(store: Store) -> None:
    """A job released at shutdown is QUEUED again with its attempt uncounted."""
    await put(store, job("a"))
    await claim(store)
    await store.report(OWNER, [Outcome("a", State.QUEUED, release=True)], T0)
    info = await store.get("a")
    assert (info.state, info.attempts) == (State.QUEUED, 0)


async def test_expired_lease_requeues_then_fails_after_max_expiries(store: Store) -> None:
    """A dead worker's job is requeued (attempt counted), and fails after too many expiries."""
    await put(store, job("a", max_attempts=10))
    for round_ in range(3):
        now = T0 + 100 * round_
        if round_ == 0:
            assert await claim(store, now=now) == ["a"]
        else:
            suspect = await store.claim_suspect(OWNER, TASKS, now, now + 10)
            assert suspect is not None
            assert suspect.id == "a"
        assert (await store.recover(now + 5, max_lease_expiries=3)).requeued == []
        recovered = await store.recover(now + 11, max_lease_expiries=3)
        if round_ < 2:
            assert recovered.requeued == ["a"]
        else:
            assert recovered.failed == ["a"]
    info = await store.get("a")
    assert info.state is State.FAILED
    assert info.attempts == 3
    assert [e.type for e in info.errors] == ["flexq.LeaseExpired"] * 3


async def test_renew_extends_leases_and_reports_abort_requests(store: Store) -> None:
    """Renewed leases do not expire; abort requests of held jobs come back from renew."""
    await put(store, job("a"), job("b"))
    await claim(store)
    assert await store.request_abort("b", T0) is State.PROCESSING
    assert await store.renew(OWNER, ["a", "b"], T0 + 30) == Renewal(aborted=["b"], lost=[])
    assert (await store.recover(T0 + 20, 3)).requeued == []


async def test_renew_extends_only_the_leases_named(store: Store) -> None:
    """A held job that renew does not name (its owner lost track of it) keeps its old lease and
    is recovered when it expires; another owner's job is not renewed by naming it."""
    await put(store, job("a"), job("b"), job("c"))
    assert await claim(store, n=2) == ["a", "b"]
    other = await store.claim("other", {"acme": 1}, TASKS, T0, T0 + 10)
    assert [j.id for j in other] == ["c"]
    renewal = await store.renew(OWNER, ["a", "c", "unknown"], T0 + 30)
    assert renewal.aborted == []
    assert sorted(renewal.lost) == ["c", "unknown"]
    assert sorted((await store.recover(T0 + 20, 3)).requeued) == ["b", "c"]


async def test_renew_reports_the_jobs_whose_lease_the_owner_lost(store: Store) -> None:
    """A job whose lease expired and another owner took over, and a job that ended, come back
    from renew as lost; jobs still held do not, and only they are renewed."""
    await put(store, job("a"), job("b"), job("c"))
    assert await claim(store) == ["a", "b", "c"]
    await store.renew(OWNER, ["b", "c"], T0 + 30)
    assert (await store.recover(T0 + 20, 3)).requeued == ["a"]
    other = await store.claim_suspect("other", TASKS, T0 + 20, T0 + 40)
    assert other is not None
    assert other.id == "a"
    assert await store.report(OWNER, [Outcome("b", State.COMPLETED)], T0 + 20) == ["b"]
    renewal = await store.renew(OWNER, ["a", "b", "c"], T0 + 50)
    assert renewal.aborted == []
    assert sorted(renewal.lost) == ["a", "b"]
    recovered = await store.recover(T0 + 45, 3)
    assert recovered.requeued == ["a"]
    assert (await store.get("c")).state is State.PROCESSING


async def test_abort_waiting_job_ends_it_and_final_job_refuses(store: Store) -> None:
    """Abort of a waiting job is final at once; aborting a final job is illegal."""
    await put(store, job("a"), job("s", run_at=T0 + 50))
    assert await store.request_abort("a", T0) is State.ABORTED
    assert await store.request_abort("s", T0) is State.ABORTED
    assert (await store.get("a")).state is State.ABORTED
    assert await claim(store) == []
    await store.promote(T0 + 60)
    assert await claim(store, now=T0 + 60) == []
    with pytest.raises(IllegalTransition):
        await store.request_abort("a", T0)
    with pytest.raises(JobNotFound):
        await store.request_abort("missing", T0)


async def test_expired_lease_of_abort_requested_job_ends_aborted(store: Store) -> None:
    """If the worker died after an abort was requested, recovery aborts the job."""
    await put(store, job("a"))
    await claim(store)
    await store.request_abort("a", T0)
    assert (await store.recover(T0 + 11, 3)).aborted == ["a"]
    assert (await store.get("a")).state is State.ABORTED


async def test_pauses_stop_claiming_by_scope(store: Store) -> None:
    """Paused tenants, tasks or the whole queue give no jobs until resumed."""
    await put(store, job("a"), job("u", task="u"), job("b", tenant="b"))
    assert await store.set_pause(PauseScope.TENANT, "b", True, T0)
    assert not await store.set_pause(PauseScope.TENANT, "b", True, T0)
    assert await store.set_pause(PauseScope.TASK, "u", True, T0)
    claimed = await store.claim(OWNER, {"acme": 5, "b": 5}, TASKS, T0, T0 + 10)
    assert [c.id for c in claimed] == ["a"]
    assert await store.set_pause(PauseScope.QUEUE, "", True, T0 + 1)
    await store.set_pause(PauseScope.TENANT, "b", False, T0)
    await store.set_pause(PauseScope.TASK, "u", False, T0)
    assert await store.claim(OWNER, {"acme": 5, "b": 5}, TASKS, T0, T0 + 10) == []
    assert [p.scope for p in await store.pauses()] == [PauseScope.QUEUE]
    await store.set_pause(PauseScope.QUEUE, "", False, T0)
    claimed = await store.claim(OWNER, {"acme": 5, "b": 5}, TASKS, T0, T0 + 10)
    assert sorted(c.id for c in claimed) == ["b", "u"]


async def test_progress_is_written_only_by_the_holder(store: Store) -> None:
    """set_progress stores JSON for a held job and refuses others."""
    await put(store, job("a"))
    assert not await store.set_progress(OWNER, "a", "1")
    await claim(store)
    assert await store.set_progress(OWNER, "a", '{"done":3}')
    assert (await store.get("a")).progress == {"done": 3}


async def test_queries_filter_page_and_count(store: Store) -> None:
    """jobs() filters and pages in creation order; counts() groups by state."""
    await put(store, *(job(f"a{i}") for i in range(5)), job("b0", tenant="b", task="u"))
    await claim(store, n=2)
    rows = await store.jobs(JobFilter(tenant="acme"), after_seq=None, offset=0, limit=3)
    assert [info.id for _, info in rows] == ["a0", "a1", "a2"]
    more = await store.jobs(JobFilter(tenant="acme"), after_seq=rows[-1][0], offset=0, limit=3)
    assert [info.id for _, info in more] == ["a3", "a4"]
    by_offset = await store.jobs(JobFilter(), after_seq=None, offset=4, limit=10)
    assert [info.id for _, info in by_offset] == ["a4", "b0"]
    processing = await store.jobs(JobFilter(state=State.PROCESSING), after_seq=None, offset=0,
                                  limit=10)  # fmt: skip
    assert [info.id for _, info in processing] == ["a0", "a1"]
    assert [i.id for _, i in await store.jobs(JobFilter(task="u"), after_seq=None, offset=0,
                                              limit=9)] == ["b0"]  # fmt: skip
    assert await store.counts(JobFilter(tenant="acme")) == {State.QUEUED: 3, State.PROCESSING: 2}
    window = JobFilter(created_after=T0, created_before=T0 + 1)
    assert len(await store.jobs(window, after_seq=None, offset=0, limit=100)) == 6
    assert await store.jobs(JobFilter(created_after=T0 + 1), after_seq=None, offset=0,
                            limit=100) == []  # fmt: skip


async def test_prune_deletes_only_old_final_jobs_in_batches(store: Store) -> None:
    """Pruning removes final jobs finished before the cutoff, at most `limit` per call."""
    await put(store, *(job(f"a{i}") for i in range(5)), job("waiting"))
    await claim(store, n=5)
    await store.report(OWNER, [Outcome(f"a{i}", State.COMPLETED) for i in range(5)], T0 + 1)
    assert await store.prune(T0 + 1, 10) == 0
    assert await store.prune(T0 + 2, 3) == 3
    assert await store.prune(T0 + 2, 3) == 2
    assert (await store.get("waiting")).state is State.QUEUED
    assert await store.counts(JobFilter()) == {State.QUEUED: 1}


async def test_get_many_returns_existing_jobs(store: Store) -> None:
    """get_many skips unknown ids."""
    await put(store, job("a"), job("b"))
    assert sorted(i.id for i in await store.get_many(["a", "zz", "b"])) == ["a", "b"]


async def test_requeued_jobs_are_suspects_claimed_only_alone(store: Store) -> None:
    """A job whose lease expired is left out of normal claims and claimed on its own."""
    await put(store, job("a"), job("b"), job("c", tenant="other"))
    await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 10)
    assert not await store.has_suspects(TASKS)
    assert (await store.recover(T0 + 11, 3)).requeued == ["a"]
    assert await store.has_suspects(TASKS)
    assert not await store.has_suspects({"u"})
    assert await store.ready_tenants(TASKS) == ["acme", "other"]
    assert await claim(store, now=T0 + 12) == ["b"]
    await store.set_pause(PauseScope.TENANT, "acme", True, T0)
    assert not await store.has_suspects(TASKS)
    assert await store.claim_suspect(OWNER, TASKS, T0 + 12, T0 + 22) is None
    await store.set_pause(PauseScope.TENANT, "acme", False, T0)
    assert await store.claim_suspect(OWNER, {"u"}, T0 + 12, T0 + 22) is None
    suspect = await store.claim_suspect(OWNER, TASKS, T0 + 12, T0 + 22)
    assert suspect is not None
    assert (suspect.id, suspect.attempt) == ("a", 2)
    assert not await store.has_suspects(TASKS)
    assert await store.claim_suspect(OWNER, TASKS, T0 + 12, T0 + 22) is None


async def test_released_job_whose_abort_was_requested_ends_aborted(store: Store) -> None:
    """Shutdown must not send back to the queue a job someone asked to abort."""
    await put(store, job("a"))
    await claim(store)
    await store.request_abort("a", T0)
    assert await store.report(OWNER, [Outcome("a", State.QUEUED, release=True)], T0 + 1) == ["a"]
    info = await store.get("a")
    assert (info.state, info.attempts) == (State.ABORTED, 0)
    assert info.finished_at is not None


async def test_retry_outcome_without_error_or_time_is_rejected(store: Store) -> None:
    """A retry must say why and when; a malformed one raises and writes nothing."""
    await put(store, job("a"))
    await claim(store)
    with pytest.raises(InvalidArguments):
        await store.report(OWNER, [Outcome("a", State.SCHEDULED, run_at=T0 + 5)], T0)
    assert (await store.get("a")).state is State.PROCESSING


async def test_claim_across_many_tasks_keeps_the_order(store: Store) -> None:
    """With hundreds of runnable tasks, a tenant's best jobs still come first."""
    tasks = {f"task{i}" for i in range(450)}
    await put(
        store,
        job("low", task="task3", priority=-1),
        job("first", task="task449"),
        job("top", task="task10", priority=5),
        job("second", task="task0"),
    )
    claimed = await store.claim(OWNER, {"acme": 3}, tasks, T0, T0 + 10)
    assert [c.id for c in sorted(claimed, key=lambda c: c.order)] == ["top", "first", "second"]


async def test_paused_task_ahead_does_not_hide_later_jobs(store: Store) -> None:
    """Jobs of a paused task, however many, do not keep the tenant's other jobs from a claim."""
    await put(store, *(job(f"p{i}", task="u") for i in range(200)), job("runnable"))
    await store.set_pause(PauseScope.TASK, "u", True, T0)
    assert await claim(store, n=5) == ["runnable"]
