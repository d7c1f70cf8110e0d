"""The memory store agrees with the SQLite and PostgreSQL stores step by step, and all follow
the transition table.

A hypothesis state machine sends the same random operations (the same job ids, the same
``now``) to a :class:`MemoryStore` and a durable store (a :class:`SQLiteStore` on a file of its
own, or a :class:`PostgresStore` on a schema of its own), and after every step checks that
they returned the same thing, that they hold the same jobs, and that what they hold is what a
small model of the store contract predicts: every state change is in
:data:`flexq._states.TRANSITIONS`, final jobs never change, a dedup key is held by at most one
unfinished job of a tenant, and claims follow priority, kind rank and age inside a tenant.

That order matters only when more of a tenant's jobs wait than a claim takes: bursts of jobs
of one tenant and claims of one or two jobs make that common, so that a store which drops or
reverses a part of the order fails within a few examples.

Set ``FLEXQ_MODEL_EXAMPLES`` to run more examples than the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Literal, TypeVar

import psycopg
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flexq._errors import DuplicateJob, IllegalTransition, JobNotFound
from flexq._models import JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import dumps, loads
from flexq._states import FINAL_STATES, RUNNING_STATES, TRANSITIONS, Kind, State
from flexq._store.base import (
    ClaimedJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    NewJob,
    OnDuplicate,
    Outcome,
    Store,
    error_record,
)
from flexq._store.memory import MemoryStore
from flexq._store.postgres import PostgresStore
from flexq._store.sqlite import SQLiteStore

from .conftest import POSTGRES_DSN

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
    from pathlib import Path

    from anyio.from_thread import BlockingPortal

T = TypeVar("T")

TENANTS = ("a", "b", "c")
TASKS = ("t1", "t2", "t3")
ALL_TASKS = frozenset(TASKS)
OWNERS = ("w1", "w2")
KEYS = ("k1", "k2")
START = 1_000_000.0
"""Epoch seconds of the first step; every time below is START plus quarter seconds, so that
floats and microsecond datetimes round-trip exactly."""
MISSING: JobId = "missing"
ENTRY_STATES = frozenset({State.QUEUED, State.SCHEDULED})
EVERYTHING = 1_000_000

OutcomeKind = Literal[
    "complete", "fail", "abort", "retry_queued", "retry_scheduled", "release", "illegal"
]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One job of an enqueue step (the id is given by the machine, in order)."""

    tenant: str
    task: str
    kind: Kind
    priority: int
    key: str | None
    delay: float
    max_attempts: int


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One unit of an enqueue step."""

    jobs: tuple[JobSpec, ...]
    on_duplicate: OnDuplicate


job_specs = st.builds(
    JobSpec,
    tenant=st.sampled_from(TENANTS),
    task=st.sampled_from(TASKS),
    # Batch jobs live in the holding queue and its slots: test_holding_model.py models them.
    kind=st.sampled_from([Kind.FUTURE, Kind.QUEUEABLE, Kind.SCHEDULED]),
    priority=st.integers(-1, 2),
    key=st.sampled_from([None, None, None, *KEYS]),
    delay=st.sampled_from([0.0, 0.0, -5.0, 0.5, 3.0, 30.0]),
    max_attempts=st.integers(1, 3),
)
unit_specs = st.builds(
    UnitSpec,
    jobs=st.lists(job_specs, min_size=1, max_size=3).map(tuple),
    on_duplicate=st.sampled_from(["raise", "return"]),
)


@st.composite
def bursts(draw: st.DrawFn) -> list[UnitSpec]:
    """Several jobs of one tenant and one or two tasks, in one unit or one unit each.

    Random units rarely put more jobs of a tenant (and task) in the queue than a claim takes,
    which is when a claim must choose among them. A burst does: mostly at one priority and
    kind rank (so that age decides, within a task and across two), some above or below (so
    that priority and kind rank do), some due earlier or later than now (so that age is not
    confused with ``run_at``).
    """
    tenant = draw(st.sampled_from(TENANTS), label="tenant")
    tasks = draw(st.lists(st.sampled_from(TASKS), min_size=1, max_size=2, unique=True), "tasks")
    jobs = draw(
        st.lists(
            st.builds(
                JobSpec,
                tenant=st.just(tenant),
                task=st.sampled_from(tasks),
                kind=st.sampled_from([Kind.QUEUEABLE, Kind.QUEUEABLE, Kind.SCHEDULED, Kind.FUTURE]),
                priority=st.sampled_from([0, 0, 0, 1, -1]),
                key=st.none(),
                delay=st.sampled_from([0.0, 0.0, 0.0, -5.0, 0.5, 3.0]),
                max_attempts=st.integers(1, 3),
            ),
            min_size=3,
            max_size=8,
        ),
        label="jobs",
    )
    if draw(st.booleans(), label="one unit"):
        return [UnitSpec(tuple(jobs), "raise")]
    return [UnitSpec((job,), "raise") for job in jobs]


def _error_json(attempt: int, now: float) -> str:
    return dumps(error_record("builtins.ValueError", "boom", "", attempt, now), "error")


def _failure_key(value: object) -> tuple[str, str] | None:
    """What must match when a call raised: the exception's type and message."""
    if isinstance(value, Exception):
        return type(value).__name__, str(value)
    return None


def _enqueue_key(result: EnqueueResult) -> Hashable:
    if isinstance(result, DuplicateJob):
        return ("duplicate", result.tenant, result.key, result.existing_id)
    if not isinstance(result, list):  # LimitExceeded: batch jobs only, not in this model
        return ("refused", str(result))
    return ("ids", tuple(result))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything a store shows at once: its jobs, ready tenants, counts and pauses."""

    rows: list[tuple[int, JobInfo]]
    ready_tenants: list[str]
    counts: dict[State, int]
    pauses: list[Pause]
    has_suspects: bool


async def _snapshot(store: Store) -> Snapshot:
    return Snapshot(
        rows=await store.jobs(JobFilter(), after_seq=None, offset=0, limit=EVERYTHING),
        ready_tenants=await store.ready_tenants(TASKS),
        counts=await store.counts(JobFilter()),
        pauses=await store.pauses(),
        has_suspects=await store.has_suspects(ALL_TASKS),
    )


async def _on_both(
    call: Callable[[Store], Awaitable[T]], stores: tuple[Store, Store]
) -> tuple[T | Exception, T | Exception]:
    """Run ``call`` on each store in turn (one portal round trip for both)."""
    results: list[T | Exception] = []
    for store in stores:
        try:
            results.append(await call(store))
        except Exception as exc:
            results.append(exc)
    return results[0], results[1]


async def _on_each(*calls: Callable[[], Awaitable[T]]) -> list[T]:
    """Await each call in turn (one portal round trip for all of them)."""
    return [await call() for call in calls]


@dataclasses.dataclass
class Lease:
    """Who holds a running job in the model, and until when."""

    owner: str
    until: float


class StoreComparison(RuleBasedStateMachine):
    """Drives a MemoryStore and another store with the same calls and compares them."""

    def __init__(self, portal: BlockingPortal, other: Store) -> None:
        super().__init__()
        self.portal = portal
        self.memory = MemoryStore()
        self.other = other
        self.name = type(other).__name__.removesuffix("Store")
        """The other store's name in messages and in :attr:`seqs`."""
        self.stores: tuple[Store, Store] = (self.memory, other)
        for store in self.stores:
            portal.call(store.open)
        self.now = START
        self.next_id = 0
        self.known: list[JobId] = []
        """Every id ever written, in creation order."""
        self.created: dict[JobId, int] = {}
        self.view: dict[JobId, JobInfo] = {}
        """The jobs both stores agreed on after the last step, in creation order."""
        self.states: dict[JobId, State] = {}
        self.finals: dict[JobId, JobInfo] = {}
        self.pruned: set[JobId] = set()
        self.run_at: dict[JobId, float] = {}
        self.leases: dict[JobId, Lease] = {}
        self.expiries: Counter[JobId] = Counter()
        """How many times each job's lease expired: a QUEUED job with any is a suspect."""
        self.pauses: set[tuple[PauseScope, str]] = set()
        self.seqs: dict[str, dict[JobId, int]] = {}
        """Each store's sequence number of each job it holds."""
        self.last_seq: dict[str, int] = {}

    def teardown(self) -> None:
        """Close both stores and remove what the other one wrote."""
        try:
            for store in self.stores:
                self.portal.call(store.close)
        finally:
            self.remove()

    def remove(self) -> None:
        """Remove the other store's database (its file, or its schema)."""
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------

    def both(self, call: Callable[[Store], Awaitable[T]]) -> tuple[T | Exception, T | Exception]:
        """Run ``call`` on the memory store, then on the other store; errors are returned."""
        return self.portal.call(_on_both, call, self.stores)

    def agree(
        self,
        what: str,
        call: Callable[[Store], Awaitable[T]],
        key: Callable[[T], object] = lambda value: value,
    ) -> T | Exception:
        """Both stores' answers to ``call``, which must match (by ``key``); memory's is returned."""
        memory, other = self.both(call)
        differ = f"{what}: memory gave {memory!r}, {self.name} gave {other!r}"
        if isinstance(memory, Exception) or isinstance(other, Exception):
            assert _failure_key(memory) == _failure_key(other), differ
            return memory
        assert key(memory) == key(other), differ
        return memory

    def comparable(self, job: ClaimedJob) -> tuple[object, ...]:
        """The claimed job's fields, its sequence number replaced by its creation index."""
        return (
            job.id, job.task, job.kind, job.tenant, job.priority, job.args, job.kwargs,
            job.attempt, job.max_attempts, job.timeout, job.parent_id,
            (*job.order[:2], self.created[job.id]),
        )  # fmt: skip

    def any_in(self, states: Collection[State]) -> bool:
        """Whether some job is in one of ``states`` (rules that need one wait for it)."""
        return any(info.state in states for info in self.view.values())

    def is_suspect(self, job_id: JobId) -> bool:
        return self.view[job_id].state is State.QUEUED and self.expiries[job_id] > 0

    def runnable(self, tasks: frozenset[str]) -> frozenset[str]:
        """The tasks a claim may take: none while the queue is paused."""
        if (PauseScope.QUEUE, "") in self.pauses:
            return frozenset()
        return tasks - {name for scope, name in self.pauses if scope is PauseScope.TASK}

    def held_by(self, owner: str) -> set[JobId]:
        return {
            job_id
            for job_id, lease in self.leases.items()
            if lease.owner == owner and self.view[job_id].state in RUNNING_STATES
        }

    def sync(self) -> None:
        """Compare both stores' jobs and check every change against the table and the model."""
        memory_snapshot, other_snapshot = self.both(_snapshot)
        assert not isinstance(memory_snapshot, Exception), memory_snapshot
        assert not isinstance(other_snapshot, Exception), other_snapshot
        memory_rows, other_rows = memory_snapshot.rows, other_snapshot.rows
        memory_infos = [info for _, info in memory_rows]
        other_infos = [info for _, info in other_rows]
        for mine, theirs in zip(memory_infos, other_infos, strict=False):
            assert mine == theirs, f"memory holds {mine!r}, {self.name} holds {theirs!r}"
        assert [i.id for i in memory_infos] == [i.id for i in other_infos]
        for name, rows in (("memory", memory_rows), (self.name, other_rows)):
            seqs = {info.id: seq for seq, info in rows}
            assert list(seqs.values()) == sorted(seqs.values()), f"{name} lists out of order"
            last = self.last_seq.get(name, 0)
            for job_id, seq in seqs.items():
                if job_id not in self.seqs.get(name, {}):
                    assert seq > last, f"{name} reused sequence number {seq} for {job_id}"
                    self.last_seq[name] = max(self.last_seq.get(name, 0), seq)
            # The numbers themselves may differ: a PostgreSQL sequence skips those of inserts
            # that rolled back. Their order is the creation order in every store.
            self.seqs[name] = seqs
        view = {info.id: info for info in memory_infos}
        unseen = set(self.created) - set(self.states) - self.pruned
        assert unseen <= set(view), f"enqueued jobs {unseen - set(view)} are not stored"
        assert list(view) == sorted(view, key=self.created.__getitem__), "not in creation order"
        for job_id, info in view.items():
            previous = self.states.get(job_id)
            if previous is None:
                assert info.state in ENTRY_STATES, f"{job_id} was created {info.state}"
            else:
                assert info.state == previous or info.state in TRANSITIONS[previous], (
                    f"{job_id} went {previous} -> {info.state}, which the table forbids"
                )
            if job_id in self.finals:
                assert info == self.finals[job_id], f"final job {job_id} changed"
            elif info.state in FINAL_STATES:
                self.finals[job_id] = info
            assert info.run_at == timestamp_to_datetime(self.run_at[job_id]), job_id
        for job_id, state in self.states.items():
            if job_id not in view:
                assert state in FINAL_STATES, f"{state} job {job_id} disappeared"
                self.pruned.add(job_id)
        holders = Counter(
            (info.tenant, info.key)
            for info in view.values()
            if info.key is not None and not info.state.is_final
        )
        assert all(n == 1 for n in holders.values()), f"a key held twice: {holders}"
        self.view = view
        self.states = {job_id: info.state for job_id, info in view.items()}
        self.leases = {
            job_id: lease
            for job_id, lease in self.leases.items()
            if job_id in view and view[job_id].state in RUNNING_STATES
        }
        assert memory_snapshot.ready_tenants == other_snapshot.ready_tenants
        assert memory_snapshot.ready_tenants == sorted(
            {
                i.tenant
                for j, i in view.items()
                if i.state is State.QUEUED and not self.is_suspect(j)
            }
        )
        assert memory_snapshot.has_suspects == other_snapshot.has_suspects
        assert memory_snapshot.has_suspects == any(
            self.is_suspect(j)
            and view[j].task in self.runnable(ALL_TASKS)
            and (PauseScope.TENANT, view[j].tenant) not in self.pauses
            for j in view
        )
        assert memory_snapshot.counts == other_snapshot.counts
        assert memory_snapshot.counts == dict(Counter(info.state for info in view.values()))
        # Pauses made at the same time are listed in different orders; the order is unspecified.
        assert set(memory_snapshot.pauses) == set(other_snapshot.pauses)
        assert {(p.scope, p.name) for p in memory_snapshot.pauses} == self.pauses

    # -- enqueue and time -------------------------------------------------------------------

    @initialize(
        burst=bursts(),
        units=st.lists(unit_specs, max_size=3),
        owner=st.sampled_from(OWNERS),
        count=st.integers(1, 2),
        lease=st.sampled_from([2.0, 10.0, 60.0]),
    )
    def first_enqueue(
        self, burst: list[UnitSpec], units: list[UnitSpec], owner: str, count: int, lease: float
    ) -> None:
        """Every run starts with some jobs, several of them of one tenant, and a claim of one
        or two of that tenant's jobs.

        Hypothesis leaves some rules out of a run (swarm testing), and many runs are short:
        this way every run makes a claim choose at least once.
        """
        self.enqueue([*burst, *units])
        self.claim(owner, {burst[0].jobs[0].tenant: count}, ALL_TASKS, lease)

    @rule(burst=bursts())
    def enqueue_burst(self, burst: list[UnitSpec]) -> None:
        """Several jobs of one tenant, of one or two tasks, are written at once."""
        self.enqueue(burst)

    @rule(units=st.lists(unit_specs, min_size=1, max_size=3))
    def enqueue(self, units: list[UnitSpec]) -> None:
        """Units are written all or nothing; a held key returns or raises the holder's id."""
        now = self.now
        built: list[EnqueueUnit] = []
        for unit in units:
            jobs = []
            for spec in unit.jobs:
                self.next_id += 1
                jobs.append(
                    NewJob(
                        id=f"j{self.next_id:03d}", task=spec.task, kind=spec.kind,
                        tenant=spec.tenant, priority=spec.priority, args="[1]",
                        kwargs='{"x":"y"}', max_attempts=spec.max_attempts, timeout=None,
                        run_at=now + spec.delay, key=spec.key, parent_id=None,
                    )
                )  # fmt: skip
            built.append(EnqueueUnit(jobs, unit.on_duplicate))
        expected = self.expected_enqueue(built)
        results = self.agree(
            "enqueue",
            lambda store: store.enqueue(built, now),
            key=lambda found: [_enqueue_key(r) for r in found],
        )
        assert not isinstance(results, Exception), results
        assert [_enqueue_key(r) for r in results] == [_enqueue_key(r) for r in expected]
        for result in results:
            if not isinstance(result, list):
                event(f"enqueue: a unit raised {type(result).__name__}")
            elif any(job_id in self.created for job_id in result):
                event("enqueue: a held key returned its job's id")
        for written, result in zip(built, results, strict=True):
            if not isinstance(result, list):
                continue
            fresh = {job.id: job for job in written.jobs}
            for job_id in result:
                if job_id in fresh and job_id not in self.created:
                    self.created[job_id] = len(self.created)
                    self.known.append(job_id)
                    self.run_at[job_id] = fresh[job_id].run_at
        self.sync()
        for written in built:
            for job in written.jobs:
                if job.id in self.view:
                    want = State.QUEUED if job.run_at <= now else State.SCHEDULED
                    assert self.view[job.id].state is want, job.id
                    assert self.view[job.id].attempts == 0

    def expected_enqueue(self, units: Sequence[EnqueueUnit]) -> list[EnqueueResult]:
        held = {
            (info.tenant, info.key): job_id
            for job_id, info in self.view.items()
            if info.key is not None and not info.state.is_final
        }
        results: list[EnqueueResult] = []
        for unit in units:
            ids: list[JobId] = []
            taken: dict[tuple[str, str], JobId] = {}
            duplicate: DuplicateJob | None = None
            for job in unit.jobs:
                if job.key is not None:
                    existing = held.get((job.tenant, job.key)) or taken.get((job.tenant, job.key))
                    if existing is not None:
                        if unit.on_duplicate == "raise":
                            duplicate = DuplicateJob(job.tenant, job.key, existing)
                            break
                        ids.append(existing)
                        continue
                    taken[(job.tenant, job.key)] = job.id
                ids.append(job.id)
            if duplicate is not None:
                results.append(duplicate)
            else:
                held.update(taken)
                results.append(ids)
        return results

    @rule(seconds=st.sampled_from([0.25, 1.0, 5.0, 20.0, 60.0]))
    def advance_time(self, seconds: float) -> None:
        """Time moves forward (stores never read a clock: they see it through ``now``)."""
        self.now += seconds

    @rule()
    @precondition(lambda self: self.any_in({State.SCHEDULED}))
    def promote(self) -> None:
        """Scheduled jobs whose time came become QUEUED; the earliest time left is returned."""
        now = self.now
        due = {j for j, i in self.view.items() if i.state is State.SCHEDULED
               and self.run_at[j] <= now}  # fmt: skip
        later = [self.run_at[j] for j, i in self.view.items()
                 if i.state is State.SCHEDULED and self.run_at[j] > now]  # fmt: skip
        result = self.agree("promote", lambda store: store.promote(now))
        assert result == (sorted({self.view[j].tenant for j in due}), min(later, default=None))
        self.sync()
        assert all(self.view[j].state is State.QUEUED for j in due)

    # -- claiming and outcomes --------------------------------------------------------------

    @rule(
        owner=st.sampled_from(OWNERS),
        wanted=st.one_of(
            st.just(dict.fromkeys(TENANTS, 2)),
            # One or two of a tenant's jobs while more wait: the claim must choose.
            st.dictionaries(st.sampled_from(TENANTS), st.integers(1, 2), min_size=1),
            st.dictionaries(st.sampled_from((*TENANTS, "nobody")), st.integers(-1, 4)),
        ),
        tasks=st.one_of(st.just(ALL_TASKS), st.frozensets(st.sampled_from((*TASKS, "unknown")))),
        lease=st.sampled_from([2.0, 10.0, 60.0]),
    )
    @precondition(lambda self: self.any_in({State.QUEUED}))
    def claim(
        self, owner: str, wanted: dict[str, int], tasks: frozenset[str], lease: float
    ) -> None:
        """Each tenant's best QUEUED jobs are claimed: priority desc, kind rank, then age."""
        now = self.now
        expected: dict[str, list[JobId]] = {}
        runnable = self.runnable(tasks)
        for tenant, count in wanted.items():
            if count <= 0 or (PauseScope.TENANT, tenant) in self.pauses:
                continue
            ready = [j for j, i in self.view.items() if i.tenant == tenant
                     and i.state is State.QUEUED and i.task in runnable
                     and not self.is_suspect(j)]  # fmt: skip
            ready.sort(key=lambda j: (-self.view[j].priority, self.view[j].kind.rank,
                                      self.created[j]))  # fmt: skip
            expected[tenant] = ready[:count]
            self.count_deciders(ready, count)
        memory_claimed, other_claimed = self.both(
            lambda store: store.claim(owner, wanted, tasks, now, now + lease)
        )
        assert not isinstance(memory_claimed, Exception), memory_claimed
        assert not isinstance(other_claimed, Exception), other_claimed
        assert Counter(map(self.comparable, memory_claimed)) == Counter(
            map(self.comparable, other_claimed)
        ), f"claim: memory gave {memory_claimed!r}, {self.name} gave {other_claimed!r}"
        for name, claimed in (("memory", memory_claimed), (self.name, other_claimed)):
            for tenant in (*TENANTS, "nobody"):
                got = [job.id for job in claimed if job.tenant == tenant]
                assert got == expected.get(tenant, []), (
                    f"{name} claimed {got} of tenant {tenant}, expected {expected.get(tenant)}"
                )
        event("claim: some jobs" if memory_claimed else "claim: none")
        before = self.view
        for job in memory_claimed:
            info = before[job.id]
            assert job.attempt == info.attempts + 1
            assert job.order == (-info.priority, info.kind.rank, self.seqs["memory"][job.id])
            self.leases[job.id] = Lease(owner, now + lease)
        self.sync()
        for job in memory_claimed:
            assert self.view[job.id].state is State.PROCESSING
            assert self.view[job.id].started_at == timestamp_to_datetime(now)

    def crowded(self) -> list[str]:
        """The tenants with two or more jobs a claim may take (pauses aside)."""
        ready = Counter(
            info.tenant
            for job_id, info in self.view.items()
            if info.state is State.QUEUED and not self.is_suspect(job_id)
        )
        return sorted(tenant for tenant, n in ready.items() if n >= 2)

    @rule(
        data=st.data(),
        owner=st.sampled_from(OWNERS),
        count=st.integers(1, 2),
        lease=st.sampled_from([2.0, 10.0, 60.0]),
    )
    @precondition(lambda self: bool(self.crowded()))
    def claim_few(self, data: st.DataObject, owner: str, count: int, lease: float) -> None:
        """A claim of one or two of a tenant's jobs while more wait takes the best of them."""
        tenant = data.draw(st.sampled_from(self.crowded()), label="tenant")
        self.claim(owner, {tenant: count}, ALL_TASKS, lease)

    def count_deciders(self, ready: list[JobId], count: int) -> None:
        """Tell hypothesis which part of the order chose a tenant's claimed jobs.

        ``ready`` is in claim order. A part decided if ordering without it (or against it)
        would have claimed other jobs: these events show how often a store that got that part
        wrong would be caught.
        """
        if len(ready) <= count:
            return
        chosen = set(ready[:count])
        view, created = self.view, self.created
        others = {
            "priority": lambda j: (view[j].kind.rank, created[j]),
            "kind rank": lambda j: (-view[j].priority, created[j]),
            "age": lambda j: (-view[j].priority, view[j].kind.rank, -created[j]),
        }
        for part, order in others.items():
            if set(sorted(ready, key=order)[:count]) != chosen:
                event(f"claim: {part} decided")

    @rule(tasks=st.frozensets(st.sampled_from((*TASKS, "unknown"))))
    def ready_tenants(self, tasks: frozenset[str]) -> None:
        """Tenants with QUEUED jobs of the tasks, suspects aside, pauses notwithstanding."""
        found = self.agree("ready_tenants", lambda store: store.ready_tenants(tasks))
        assert found == sorted(
            {
                info.tenant
                for job_id, info in self.view.items()
                if info.state is State.QUEUED and info.task in tasks and not self.is_suspect(job_id)
            }
        )

    @rule(
        owner=st.sampled_from(OWNERS),
        tasks=st.one_of(st.just(ALL_TASKS), st.frozensets(st.sampled_from((*TASKS, "unknown")))),
        lease=st.sampled_from([2.0, 10.0, 60.0]),
    )
    @precondition(lambda self: any(map(self.is_suspect, self.view)))
    def claim_suspect(self, owner: str, tasks: frozenset[str], lease: float) -> None:
        """The oldest suspect of a runnable task and an unpaused tenant is claimed alone."""
        now = self.now
        runnable = self.runnable(tasks)
        suspects = [
            j
            for j, i in self.view.items()
            if self.is_suspect(j)
            and i.task in runnable
            and (PauseScope.TENANT, i.tenant) not in self.pauses
        ]
        expected = min(suspects, key=self.created.__getitem__, default=None)
        claimed = self.agree(
            "claim_suspect",
            lambda store: store.claim_suspect(owner, tasks, now, now + lease),
            key=lambda job: None if job is None else self.comparable(job),
        )
        assert not isinstance(claimed, Exception), claimed
        assert (None if claimed is None else claimed.id) == expected
        event("claim_suspect: one" if claimed else "claim_suspect: none")
        if claimed is not None:
            assert claimed.attempt == self.view[claimed.id].attempts + 1
            self.leases[claimed.id] = Lease(owner, now + lease)
        self.sync()
        if claimed is not None:
            assert self.view[claimed.id].state is State.PROCESSING

    @rule(data=st.data(), count=st.integers(1, 3))
    @precondition(lambda self: self.any_in(RUNNING_STATES))
    def report(self, data: st.DataObject, count: int) -> None:
        """Outcomes of held jobs are written, others dropped; an illegal one writes nothing."""
        now = self.now
        running = [j for j, i in self.view.items() if i.state in RUNNING_STATES]
        pick = st.sampled_from([*self.known, MISSING])
        if running:
            pick = st.one_of(st.sampled_from(running), pick)
        outcomes: list[Outcome] = []
        kinds: list[OutcomeKind] = []
        for _ in range(count):
            job_id = data.draw(pick, label="job")
            kind: OutcomeKind = data.draw(
                st.sampled_from(
                    ["complete", "fail", "abort", "retry_queued", "retry_scheduled", "release",
                     "complete", "fail", "retry_scheduled", "illegal"]
                ),
                label="outcome",
            )  # fmt: skip
            attempt = self.view[job_id].attempts if job_id in self.view else 1
            error = _error_json(attempt, now)
            outcome: Outcome
            if kind == "complete":
                result = data.draw(
                    st.sampled_from([None, "42", '{"ok":true}', '"x"']), label="result"
                )
                outcome = Outcome(job_id, State.COMPLETED, result=result)
            elif kind == "fail":
                outcome = Outcome(job_id, State.FAILED, error=error)
            elif kind == "abort":
                outcome = Outcome(job_id, State.ABORTED)
            elif kind in ("retry_queued", "retry_scheduled"):
                delay = data.draw(st.sampled_from([-1.0, 0.0, 2.0, 10.0]), label="delay")
                target = State.QUEUED if kind == "retry_queued" else State.SCHEDULED
                outcome = Outcome(job_id, target, error=error, run_at=now + delay)
            elif kind == "release":
                outcome = Outcome(job_id, State.QUEUED, release=True)
            else:
                illegal = sorted(set(State) - TRANSITIONS[State.PROCESSING])
                outcome = Outcome(job_id, data.draw(st.sampled_from(illegal), label="illegal"))
            outcomes.append(outcome)
            kinds.append(kind)
        # Mostly the holder of the first job reports, as a worker does.
        holder = self.leases.get(outcomes[0].job_id)
        owners = OWNERS if holder is None else (holder.owner, *OWNERS)
        owner = data.draw(st.sampled_from(owners), label="owner")
        before = self.view
        written = self.agree("report", lambda store: store.report(owner, outcomes, now), key=sorted)
        if "illegal" in kinds:
            assert isinstance(written, IllegalTransition), written
            self.sync()
            assert self.view == before, "a report that raised IllegalTransition wrote something"
            return
        held = self.held_by(owner)
        expected: list[JobId] = []
        for outcome in outcomes:
            if outcome.job_id in held:
                held.discard(outcome.job_id)
                expected.append(outcome.job_id)
        # The ids written come back in no particular order (a store may group them by statement).
        assert isinstance(written, list), written
        assert sorted(written) == sorted(expected)
        event("report: some written" if written else "report: all dropped")
        by_id = {o.job_id: (o, k) for o, k in reversed(list(zip(outcomes, kinds, strict=True)))}
        for job_id in expected:
            outcome, kind = by_id[job_id]
            if outcome.state in (State.QUEUED, State.SCHEDULED) and not outcome.release:
                assert outcome.run_at is not None
                self.run_at[job_id] = outcome.run_at
        self.sync()
        for job_id in expected:
            outcome, kind = by_id[job_id]
            old, new = before[job_id], self.view[job_id]
            target = outcome.state
            if outcome.release:
                target = State.ABORTED if old.abort_requested else State.QUEUED
            assert new.state is target, f"{job_id}: {kind} left it {new.state}"
            assert new.attempts == old.attempts - (1 if outcome.release else 0)
            assert len(new.errors) == len(old.errors) + (outcome.error is not None)
            if target.is_final:
                assert new.finished_at == timestamp_to_datetime(now)
                want = None if outcome.result is None else loads(outcome.result)
                assert new.result == want

    @rule(
        owner=st.sampled_from(OWNERS),
        lease=st.sampled_from([-1.0, 5.0, 60.0]),
        every=st.sampled_from([1, 2]),
    )
    @precondition(lambda self: self.any_in(RUNNING_STATES))
    def renew(self, owner: str, lease: float, every: int) -> None:
        """Renewing extends the owner's leases of the jobs named (every job, or every other,
        held or not), names those whose abort was requested and those the owner does not hold."""
        until = self.now + lease
        named = sorted(self.view)[::every]
        held = self.held_by(owner) & set(named)
        found = self.agree(
            "renew",
            lambda store: store.renew(owner, named, until),
            key=lambda renewal: (set(renewal.aborted), set(renewal.lost)),
        )
        assert not isinstance(found, Exception), found
        assert set(found.aborted) == {j for j in held if self.view[j].abort_requested}
        assert set(found.lost) == set(named) - held
        for job_id in held:
            self.leases[job_id].until = until
        self.sync()

    @rule(max_expiries=st.integers(1, 3), later=st.sampled_from([0.0, 5.0, 30.0, 90.0]))
    @precondition(lambda self: self.any_in(RUNNING_STATES))
    def recover(self, max_expiries: int, later: float) -> None:
        """Expired leases are requeued, failed after too many expiries, or aborted if asked."""
        self.now += later
        now = self.now
        expected: dict[str, set[JobId]] = {"requeued": set(), "failed": set(), "aborted": set()}
        for job_id, lease in self.leases.items():
            if lease.until >= now:
                continue
            self.expiries[job_id] += 1
            if self.view[job_id].abort_requested:
                expected["aborted"].add(job_id)
            elif self.expiries[job_id] >= max_expiries:
                expected["failed"].add(job_id)
            else:
                expected["requeued"].add(job_id)
        found = self.agree(
            "recover",
            lambda store: store.recover(now, max_expiries),
            key=lambda r: (set(r.requeued), set(r.failed), set(r.aborted)),
        )
        assert not isinstance(found, Exception), found
        assert set(found.requeued) == expected["requeued"]
        assert set(found.failed) == expected["failed"]
        assert set(found.aborted) == expected["aborted"]
        for bucket, ids in expected.items():
            if ids:
                event(f"recover: {bucket}")
        before = self.view
        self.sync()
        for job_id in set().union(*expected.values()):
            assert len(self.view[job_id].errors) == len(before[job_id].errors) + 1
            assert self.view[job_id].attempts == before[job_id].attempts

    # -- control ----------------------------------------------------------------------------

    @rule(data=st.data())
    def request_abort(self, data: st.DataObject) -> None:
        """Waiting jobs end ABORTED, running ones are flagged, final ones raise."""
        now = self.now
        job_id = data.draw(st.sampled_from([*self.known, MISSING]), label="job")
        state = self.agree("request_abort", lambda store: store.request_abort(job_id, now))
        info = self.view.get(job_id)
        if info is None:
            assert isinstance(state, JobNotFound), state
        elif info.state.is_final:
            assert isinstance(state, IllegalTransition), state
        elif info.state in RUNNING_STATES:
            assert state is info.state
        else:
            assert state is State.ABORTED
        self.sync()
        if info is not None and not info.state.is_final:
            assert self.view[job_id].abort_requested

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    @precondition(lambda self: self.any_in(RUNNING_STATES))
    def set_progress(self, data: st.DataObject, owner: str) -> None:
        """Progress is written only by the job's current owner."""
        job_id = data.draw(st.sampled_from([*self.known, MISSING]), label="job")
        progress = data.draw(st.sampled_from(['{"done":1}', "0.5", "null"]), label="progress")
        stored = self.agree(
            "set_progress", lambda store: store.set_progress(owner, job_id, progress)
        )
        assert stored == (job_id in self.held_by(owner))
        self.sync()
        if stored:
            assert self.view[job_id].progress == loads(progress)

    @rule(
        scope=st.sampled_from([PauseScope.TENANT, PauseScope.TASK, PauseScope.QUEUE]),
        tenant=st.sampled_from(TENANTS),
        task=st.sampled_from(TASKS),
        # Mostly resume, so that pauses come and go rather than stop all claiming for good.
        paused=st.sampled_from([False, True, False]),
    )
    def set_pause(self, scope: PauseScope, tenant: str, task: str, paused: bool) -> None:
        """Pausing twice or resuming what is not paused changes nothing and says so."""
        name = {PauseScope.QUEUE: "", PauseScope.TENANT: tenant, PauseScope.TASK: task}[scope]
        now = self.now
        changed = self.agree("set_pause", lambda store: store.set_pause(scope, name, paused, now))
        assert changed == (((scope, name) in self.pauses) != paused)
        if paused:
            self.pauses.add((scope, name))
        else:
            self.pauses.discard((scope, name))
        self.sync()

    @rule(age=st.sampled_from([0.0, 5.0, 30.0]), limit=st.sampled_from([1, 2, 1000]))
    @precondition(lambda self: self.any_in(FINAL_STATES))
    def prune(self, age: float, limit: int) -> None:
        """Up to ``limit`` final jobs that finished before the time are deleted."""
        before = self.now - age
        eligible = {j for j, i in self.view.items() if i.state.is_final
                    and i.finished_at is not None
                    and i.finished_at < timestamp_to_datetime(before)}  # fmt: skip
        memory_count, other_count = self.both(lambda store: store.prune(before, limit))
        assert memory_count == other_count == min(limit, len(eligible))
        if eligible:
            event("prune: partial" if len(eligible) > limit else "prune: all eligible")
        oldest = sorted(eligible, key=lambda j: (self.view[j].finished_at, self.seqs["memory"][j]))
        old = set(self.view)
        self.sync()
        assert old - set(self.view) == set(oldest[:limit]), "prune took not the oldest finished"

    # -- queries ----------------------------------------------------------------------------

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        """get() returns the job or raises JobNotFound (never enqueued, or pruned)."""
        job_id = data.draw(st.sampled_from([*self.known, MISSING]), label="job")
        info = self.agree("get", lambda store: store.get(job_id))
        if job_id in self.view:
            assert info == self.view[job_id]
        else:
            assert isinstance(info, JobNotFound), info

    @rule(data=st.data())
    def get_many(self, data: st.DataObject) -> None:
        """get_many() returns the jobs that exist among the ids, in any order."""
        ids = data.draw(
            st.lists(st.sampled_from([*self.known, MISSING]), max_size=4, unique=False),
            label="ids",
        )
        found = self.agree(
            "get_many",
            lambda store: store.get_many(ids),
            key=lambda infos: sorted(infos, key=lambda i: i.id),
        )
        assert not isinstance(found, Exception), found
        assert sorted(i.id for i in found) == sorted({j for j in ids if j in self.view})

    @rule(
        data=st.data(),
        tenant=st.one_of(st.none(), st.sampled_from(TENANTS)),
        state=st.one_of(st.none(), st.sampled_from(list(State))),
        kind=st.one_of(st.none(), st.sampled_from(list(Kind))),
        task=st.one_of(st.none(), st.sampled_from(TASKS)),
        offset=st.integers(0, 2),
        limit=st.integers(1, 5),
    )
    def query(
        self,
        data: st.DataObject,
        tenant: str | None,
        state: State | None,
        kind: Kind | None,
        task: str | None,
        offset: int,
        limit: int,
    ) -> None:
        """Filtered pages of jobs() after a job's cursor, and counts(), match the model."""
        where = JobFilter(tenant=tenant, state=state, kind=kind, task=task)
        cursors = st.sampled_from(list(self.view)) if self.view else st.nothing()
        cursor = data.draw(st.one_of(st.none(), cursors), "cursor")
        # A cursor is the sequence number of the last job of the previous page, in that store.
        after = {
            name: None if cursor is None else self.seqs[name][cursor]
            for name in ("memory", self.name)
        }
        memory_page, other_page = self.portal.call(
            _on_each,
            lambda: self.memory.jobs(where, after_seq=after["memory"], offset=offset, limit=limit),
            lambda: self.other.jobs(where, after_seq=after[self.name], offset=offset, limit=limit),
        )
        matching = [info for info in self.view.values() if _matches(info, where)]
        page = [
            info
            for info in matching
            if cursor is None or self.created[info.id] > self.created[cursor]
        ][offset : offset + limit]
        assert [info for _, info in memory_page] == page
        assert [info for _, info in other_page] == page
        counts = self.agree("counts", lambda store: store.counts(where))
        assert counts == dict(Counter(info.state for info in matching))


def _matches(info: JobInfo, where: JobFilter) -> bool:
    return (
        (where.tenant is None or info.tenant == where.tenant)
        and (where.state is None or info.state is where.state)
        and (where.kind is None or info.kind is where.kind)
        and (where.task is None or info.task == where.task)
    )


class SQLiteComparison(StoreComparison):
    """The memory store against a SQLite file of the run's own."""

    def __init__(self, portal: BlockingPortal, path: str) -> None:
        self.path = path
        super().__init__(portal, SQLiteStore(path))

    def remove(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path + suffix)


class PostgresComparison(StoreComparison):
    """The memory store against a PostgreSQL schema of the run's own."""

    def __init__(self, portal: BlockingPortal) -> None:
        self.schema = f"flexq_model_{uuid.uuid4().hex[:16]}"
        super().__init__(portal, PostgresStore(POSTGRES_DSN, schema=self.schema, connections=1))

    def remove(self) -> None:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


# Shrinking a failure replays many runs, which can take minutes: give it time to finish.
@pytest.mark.timeout(600)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "options"),
    [
        pytest.param("asyncio", {"debug": True}, id="asyncio"),
        pytest.param("trio", {}, id="trio"),
    ],
)
@pytest.mark.parametrize(
    ("database", "default_examples"),
    # A PostgreSQL step costs several round trips, and each run a schema: fewer runs.
    [pytest.param("sqlite", 200, id="sqlite"), pytest.param("postgres", 40, id="postgres")],
)
def test_the_memory_store_agrees_with_a_durable_one(
    backend: str,
    options: dict[str, object],
    database: str,
    default_examples: int,
    tmp_path: Path,
) -> None:
    """Random operation sequences give the same results and jobs on both stores."""
    examples = int(os.environ.get("FLEXQ_MODEL_EXAMPLES", default_examples))
    runs = itertools.count()
    with start_blocking_portal(backend, options) as portal:

        class OnSQLite(SQLiteComparison):
            def __init__(self) -> None:
                super().__init__(portal, str(tmp_path / f"model-{next(runs)}.db"))

        class OnPostgres(PostgresComparison):
            def __init__(self) -> None:
                super().__init__(portal)

        run_state_machine_as_test(
            OnSQLite if database == "sqlite" else OnPostgres,
            settings=settings(
                max_examples=examples,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
