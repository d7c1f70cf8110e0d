"""Small parts on their own: the transition table, backoff, group commit."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import anyio
import pytest

import flexq
from flexq._backoff import retry_pause
from flexq._batching import GroupCommit
from flexq._cancellation import to_the_end
from flexq._parking import parking_lot
from flexq._states import FINAL_STATES, check_transition
from flexq._store._thread import DatabaseThread


def test_final_states_lead_nowhere_and_every_state_is_in_the_table() -> None:
    """Final states have no way out; every state has an entry."""
    assert set(flexq.TRANSITIONS) == set(flexq.State)
    for state in FINAL_STATES:
        assert flexq.TRANSITIONS[state] == frozenset()
        assert state.is_final
        with pytest.raises(flexq.IllegalTransition):
            check_transition(state, flexq.State.QUEUED, "j")


def test_illegal_transition_names_the_job_and_states() -> None:
    """The error says which job tried which move."""
    with pytest.raises(
        flexq.IllegalTransition, match="job 'j1' cannot go from QUEUED to COMPLETED"
    ):
        check_transition(flexq.State.QUEUED, flexq.State.COMPLETED, "j1")
    to_aborted = {s for s, targets in flexq.TRANSITIONS.items() if flexq.State.ABORTED in targets}
    assert to_aborted == set(flexq.State) - FINAL_STATES


def test_backoff_grows_exponentially_up_to_the_maximum() -> None:
    """Without jitter the waits double and stop at the cap."""
    backoff = flexq.Backoff(base=1.0, factor=2.0, maximum=10.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff.delay(10_000) == 10.0


def test_retry_pauses_double_from_the_first_up_to_two_seconds() -> None:
    """A loop that keeps failing on the store pauses longer each time, never over 2 s."""
    pauses = [0.0]
    for _ in range(8):
        pauses.append(retry_pause(pauses[-1], 0.05))
    assert pauses[1:] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert retry_pause(0.0, 60.0) == 2.0


def test_backoff_jitter_stays_within_its_bounds() -> None:
    """Jitter moves each wait by at most the given fraction, and not always the same way."""
    backoff = flexq.Backoff(base=4.0, jitter=0.25)
    rng = random.Random(7)
    waits = {backoff.delay(1, rng) for _ in range(200)}
    assert all(3.0 <= w <= 5.0 for w in waits)
    assert len(waits) > 100


def test_backoff_rejects_nonsense() -> None:
    """Negative waits, shrinking factors and jitter over 1 are refused."""
    for options in [{"base": -1.0}, {"factor": 0.5}, {"jitter": 2.0}, {"maximum": -1.0}]:
        with pytest.raises(flexq.InvalidArguments):
            flexq.Backoff(**options)


async def test_group_commit_coalesces_concurrent_submissions() -> None:
    """Concurrent submitters share flushes and each gets its own result."""
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await anyio.sleep(0.01)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(flush)
    results: dict[int, int] = {}

    async def submit(n: int) -> None:
        results[n] = await group.submit(n)

    async with anyio.create_task_group() as tasks:
        for n in range(50):
            tasks.start_soon(submit, n)
    assert results == {n: n * 10 for n in range(50)}
    assert len(batches) < 10
    assert sorted(item for batch in batches for item in batch) == list(range(50))


async def test_group_commit_failure_reaches_every_caller_of_the_batch() -> None:
    """A failed flush raises in each of its callers; the next batch is unaffected."""
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)
        if calls == 1:
            raise OSError("disk full")
        return items

    group: GroupCommit[int, int] = GroupCommit(flush)
    outcomes: list[str] = []

    async def submit(n: int) -> None:
        try:
            await group.submit(n)
            outcomes.append("ok")
        except OSError:
            outcomes.append("failed")

    async with anyio.create_task_group() as tasks:
        for n in range(3):
            tasks.start_soon(submit, n)
    assert outcomes.count("failed") >= 1
    assert len(outcomes) == 3
    assert await group.submit(9) == 9


async def test_group_commit_survives_a_cancelled_leader() -> None:
    """If the leading caller is cancelled, the batch it carries is still written for the others."""
    written: list[int] = []
    flushing = anyio.Event()

    async def flush(items: list[int]) -> list[int]:
        flushing.set()
        await anyio.sleep(0.05)
        written.extend(items)
        return items

    group: GroupCommit[int, int] = GroupCommit(flush)
    with anyio.move_on_after(0.01):
        await group.submit(1)
    assert written == [1]
    assert await group.submit(2) == 2


ASYNCIO_ONLY = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]
)


@ASYNCIO_ONLY
async def test_group_commit_leader_cancelled_by_asyncio_during_its_flush() -> None:
    """asyncio's own cancellation (``task.cancel()``, ``asyncio.timeout``) of a leader that is
    flushing through a store call that runs to its end (as the PostgreSQL store's do): the
    others of its batch get their results, and the leader gets its cancellation."""
    flushing = anyio.Event()

    async def write(items: list[int]) -> list[int]:
        flushing.set()
        await anyio.sleep(0.05)
        return [item * 10 for item in items]

    async def flush(items: list[int]) -> list[int]:
        return await to_the_end(write(items))

    group: GroupCommit[int, int] = GroupCommit(flush)
    leader = asyncio.ensure_future(group.submit(1))
    follower = asyncio.ensure_future(group.submit(2))
    await flushing.wait()
    leader.cancel()
    assert await follower == 20
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await group.submit(3) == 30


@ASYNCIO_ONLY
async def test_work_run_to_its_end_within_such_work_needs_no_task_of_its_own() -> None:
    """Inside work that runs to its end, more such work runs in the same task (one task per
    call, not one per level), and a cancellation of the caller stops neither level."""
    tasks: list[asyncio.Task[Any] | None] = []
    inner_done = anyio.Event()

    async def inner() -> int:
        tasks.append(asyncio.current_task())
        await anyio.sleep(0.05)
        inner_done.set()
        return 2

    async def outer() -> int:
        tasks.append(asyncio.current_task())
        return await to_the_end(inner()) + 1

    assert await to_the_end(outer()) == 3
    assert tasks[0] is tasks[1] is not asyncio.current_task()
    inner_done = anyio.Event()
    caller = asyncio.ensure_future(to_the_end(outer()))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    with anyio.fail_after(2):
        await inner_done.wait()  # the inner work went on after its caller's cancellation


@ASYNCIO_ONLY
async def test_group_commit_leader_cancelled_by_asyncio_while_waiting_its_turn() -> None:
    """A leader cancelled by asyncio while the batch before its own is flushing still flushes
    its batch once that one is over: its followers and later callers are not left waiting."""
    release = anyio.Event()
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        if not flushed:
            await release.wait()
        flushed.append(items)
        return items

    group: GroupCommit[int, int] = GroupCommit(flush)
    first = asyncio.ensure_future(group.submit(1))
    await asyncio.sleep(0.01)  # batch 1 is flushing
    leader = asyncio.ensure_future(group.submit(2))
    follower = asyncio.ensure_future(group.submit(3))
    await asyncio.sleep(0.01)
    leader.cancel()
    await asyncio.sleep(0.01)
    release.set()
    with anyio.fail_after(2):
        assert await first == 1
        assert await follower == 3
        assert await group.submit(4) == 4
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert flushed == [[1], [2, 3], [4]]


async def test_group_commit_flush_interrupted_by_a_base_exception() -> None:
    """A flush that ends by a BaseException (not a failure of the store) gives the others of
    its batch a StoreError that says the write may have happened, not a wrong result."""

    class Interrupted(BaseException):
        pass

    release = anyio.Event()
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            return items
        raise Interrupted

    group: GroupCommit[int, int] = GroupCommit(flush)
    outcomes: dict[int, object] = {}

    async def submit(n: int) -> None:
        try:
            outcomes[n] = await group.submit(n)
        except (Interrupted, flexq.StoreError) as exc:
            outcomes[n] = exc

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(submit, 1)
        await anyio.sleep(0.01)  # 1 is flushing: 2 and 3 make the next batch, led by 2
        tasks.start_soon(submit, 2)
        await anyio.sleep(0.01)
        tasks.start_soon(submit, 3)
        await anyio.sleep(0.01)
        release.set()
    assert outcomes[1] == 1
    assert isinstance(outcomes[2], Interrupted)
    assert isinstance(outcomes[3], flexq.StoreError)
    assert "may have happened" in str(outcomes[3])


class _Parked:
    """Tasks parked in one lot, each in a cancel scope of its own, noting when they wake."""

    def __init__(self, count: int) -> None:
        self.lot = parking_lot()
        self.woken: list[int] = []
        self.scopes = [anyio.CancelScope() for _ in range(count)]

    def start(self, group: anyio.abc.TaskGroup) -> None:
        for n in range(len(self.scopes)):
            group.start_soon(self._park, n)

    async def _park(self, n: int) -> None:
        with self.scopes[n]:
            await self.lot.park()
            self.woken.append(n)


async def test_parked_tasks_wake_as_many_as_unparked_and_leave_when_cancelled() -> None:
    """Unparking wakes that many parked tasks and no more; a task cancelled while parked
    leaves the lot, so the count of parked tasks stays true."""
    parked = _Parked(4)
    lot, woken = parked.lot, parked.woken
    async with anyio.create_task_group() as group:
        parked.start(group)
        await anyio.wait_all_tasks_blocked()
        assert len(lot) == 4
        lot.unpark(count=2)
        await anyio.wait_all_tasks_blocked()
        assert (len(woken), len(lot)) == (2, 2)
        cancelled = next(n for n in range(4) if n not in woken)
        parked.scopes[cancelled].cancel()
        await anyio.wait_all_tasks_blocked()
        assert len(lot) == 1
        lot.unpark_all()
    assert sorted(woken) == sorted(set(range(4)) - {cancelled})
    assert len(lot) == 0


async def test_a_task_cancelled_while_parked_is_not_woken() -> None:
    """Unparking right after a parked task was cancelled, before that task ran again, wakes
    the others and not it."""
    parked = _Parked(3)
    async with anyio.create_task_group() as group:
        parked.start(group)
        await anyio.wait_all_tasks_blocked()
        parked.scopes[2].cancel()
        parked.lot.unpark(count=2)
    assert sorted(parked.woken) == [0, 1]
    assert len(parked.lot) == 0


async def test_a_call_on_a_database_thread_ends_before_its_cancelled_caller_goes_on() -> None:
    """Cancelling the caller of a blocking call does not abandon it: the caller waits for the
    call to end (a transaction is never left half done); the thread serves the next call."""
    thread = DatabaseThread("flexq-test")
    thread.start()
    release = threading.Event()
    ended: list[int] = []
    seen_by_caller: list[int] = []
    scope = anyio.CancelScope()

    def slow() -> int:
        release.wait(10)
        ended.append(1)
        return 1

    async def caller() -> None:
        with scope:
            await thread.run(slow)
        seen_by_caller.append(len(ended))

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(caller)
            await anyio.sleep(0.05)
            scope.cancel()
            await anyio.sleep(0.05)
            assert not seen_by_caller  # cancelled, and still waiting for the call
            release.set()
        assert seen_by_caller == [1]
        assert await thread.run(lambda: 2) == 2
    finally:
        await thread.stop()
