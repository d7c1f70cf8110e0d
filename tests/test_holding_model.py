"""The holding queue and active slots of every store against a plain list model.

A hypothesis state machine enqueues batch jobs (some with keys), moves them in their tenant's
holding queue, aborts them, and claims and ends admitted ones, on a :class:`MemoryStore`, a
:class:`SQLiteStore` and a :class:`PostgresStore` at once. After every step each store's
``holding_order`` and ``usage`` of every tenant, and the state of every job, must be what the
model says: per tenant a list (the holding queue, first to be admitted first) and a set (the
jobs in an active slot).

Set ``FLEXQ_MODEL_EXAMPLES`` to run more examples than the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flexq import (
    DuplicateJob,
    IllegalTransition,
    InvalidArguments,
    JobNotFound,
    LimitExceeded,
    Limits,
    NotHolding,
    State,
)
from flexq._limits import LimitTable
from flexq._states import Kind
from flexq._store.base import EnqueueUnit, NewJob, OnDuplicate, Outcome, Placement
from flexq._store.memory import MemoryStore
from flexq._store.postgres import PostgresStore
from flexq._store.sqlite import SQLiteStore

from .conftest import POSTGRES_DSN

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from anyio.from_thread import BlockingPortal

    from flexq.abc import Store

TENANTS = ("a", "b", "c")
LIMITS = LimitTable(
    Limits(max_holding=6, max_active_batches=2),
    {"b": Limits(max_holding=4, max_active_batches=0), "c": Limits(max_holding=3)},
)
NOW = 1_700_000_000.0
OWNER = "worker"
MISSING = "missing"
PLACES = ("front", "end", "before", "after", "index")


def _batch_job(job_id: str, tenant: str, key: str | None) -> NewJob:
    return NewJob(
        id=job_id, task="batch", kind=Kind.BATCH, tenant=tenant, priority=0, args="[]",
        kwargs="{}", max_attempts=1, timeout=None, run_at=NOW, key=key, parent_id=None,
    )  # fmt: skip


def _error_kind(value: object) -> object:
    """What must match between the model and a store: the result, or the error's type."""
    return type(value) if isinstance(value, Exception) else value


async def _each(stores: tuple[Store, ...], call: Callable[[Store], Awaitable[Any]]) -> list[Any]:
    results: list[Any] = []
    for store in stores:
        try:
            results.append(await call(store))
        except Exception as exc:
            results.append(exc)
    return results


@dataclasses.dataclass
class Model:
    """What the stores should hold."""

    holding: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    active: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Admitted jobs of each tenant, QUEUED or running, in creation order."""
    running: set[str] = dataclasses.field(default_factory=set)
    aborting: set[str] = dataclasses.field(default_factory=set)
    prepared: set[str] = dataclasses.field(default_factory=set)
    """Running jobs whose abort was requested."""
    states: dict[str, State] = dataclasses.field(default_factory=dict)
    tenant: dict[str, str] = dataclasses.field(default_factory=dict)
    key: dict[str, str] = dataclasses.field(default_factory=dict)
    created: list[str] = dataclasses.field(default_factory=list)

    def admit(self, tenant: str) -> None:
        holding = self.holding.setdefault(tenant, [])
        active = self.active.setdefault(tenant, [])
        while holding and len(active) < LIMITS(tenant).max_active_batches:
            job_id = holding.pop(0)
            active.append(job_id)
            self.states[job_id] = State.QUEUED
        active.sort(key=self.created.index)

    def end(self, job_id: str, state: State) -> None:
        tenant = self.tenant[job_id]
        self.states[job_id] = state
        self.running.discard(job_id)
        if job_id in self.holding.get(tenant, []):
            self.holding[tenant].remove(job_id)
        else:
            self.active[tenant].remove(job_id)
            self.admit(tenant)


class HoldingQueues(RuleBasedStateMachine):
    """Every store against the model, step by step."""

    def __init__(self, portal: BlockingPortal, sqlite_path: str) -> None:
        super().__init__()
        self.portal = portal
        self.sqlite_path = sqlite_path
        self.postgres = PostgresStore(
            POSTGRES_DSN, schema=f"flexq_model_{uuid.uuid4().hex[:16]}", connections=1
        )
        self.stores: tuple[Store, ...] = (MemoryStore(), SQLiteStore(sqlite_path), self.postgres)
        for store in self.stores:
            store.set_limits(LIMITS)
            portal.call(store.open)
        self.model = Model()
        self.ids = itertools.count()

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.portal.call(store.close)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.sqlite_path + suffix)
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.postgres.schema}" CASCADE')

    def on_stores(self, call: Callable[[Store], Awaitable[Any]]) -> list[Any]:
        return self.portal.call(_each, self.stores, call)

    def each(self, answer: object) -> list[object]:
        """The answers of all stores, if each gives ``answer``."""
        return [answer] * len(self.stores)

    def pick(self, data: st.DataObject, label: str) -> str:
        """A job id: mostly one that exists, sometimes one that never did."""
        return data.draw(st.sampled_from([*self.model.created, MISSING]), label=label)

    # -- rules ------------------------------------------------------------------------------

    @rule(
        specs=st.lists(
            st.tuples(st.sampled_from(TENANTS), st.sampled_from([None, None, "k1", "k2"])),
            min_size=1,
            max_size=3,
        ),
        on_duplicate=st.sampled_from(["raise", "return"]),
    )
    def enqueue(self, specs: list[tuple[str, str | None]], on_duplicate: OnDuplicate) -> None:
        """A unit of batch jobs is written whole (HOLDING, then admitted) or refused whole; a
        key held by an unfinished job raises DuplicateJob or returns its holder, which takes
        no room in the holding queue."""
        jobs = [_batch_job(f"j{next(self.ids)}", tenant, key) for tenant, key in specs]
        model = self.model
        held = {
            (model.tenant[j], key): j
            for j, key in model.key.items()
            if not model.states[j].is_final
        }
        expected: object = None
        ids: list[str] = []
        fresh: list[NewJob] = []
        for job in jobs:
            if job.key is not None:
                holder = held.get((job.tenant, job.key))
                if holder is not None and on_duplicate == "raise":
                    expected = DuplicateJob
                    break
                if holder is not None:
                    ids.append(holder)
                    continue
                held[(job.tenant, job.key)] = job.id
            fresh.append(job)
            ids.append(job.id)
        if expected is None:
            for tenant in {job.tenant for job in fresh}:
                limits = LIMITS(tenant)
                holding = len(model.holding.get(tenant, []))
                free = max(0, limits.max_active_batches - len(model.active.get(tenant, [])))
                count = sum(job.tenant == tenant for job in fresh)
                if holding + count - min(free, holding + count) > limits.max_holding:
                    expected = LimitExceeded
        unit = EnqueueUnit(jobs, on_duplicate)
        results = self.on_stores(lambda store: store.enqueue([unit], NOW))
        for (result,) in results:
            if expected is None:
                assert result == ids, result
            else:
                assert type(result) is expected, result
        if expected is not None:
            return
        for job in fresh:
            model.created.append(job.id)
            model.tenant[job.id] = job.tenant
            if job.key is not None:
                model.key[job.id] = job.key
            model.states[job.id] = State.HOLDING
            model.holding.setdefault(job.tenant, []).append(job.id)
        for job in fresh:
            model.admit(job.tenant)

    @rule(data=st.data(), to=st.sampled_from(PLACES), place=st.integers(0, 7))
    def reorder(self, data: st.DataObject, to: str, place: int) -> None:
        """A move changes the order as list.insert would, or raises, changing nothing."""
        model = self.model
        job_id = self.pick(data, "job")
        other = self.pick(data, "other") if to in ("before", "after") else None
        expected: object
        if job_id not in model.states:
            expected = JobNotFound
        elif model.states[job_id] is not State.HOLDING:
            expected = NotHolding
        elif other is not None and other not in model.states:
            expected = JobNotFound
        elif other is not None and model.states[other] is not State.HOLDING:
            expected = NotHolding
        elif other is not None and (model.tenant[other] != model.tenant[job_id] or other == job_id):
            expected = InvalidArguments
        else:
            order = model.holding[model.tenant[job_id]]
            rest = [j for j in order if j != job_id]
            if to == "front":
                index = 0
            elif to == "end":
                index = len(rest)
            elif to == "index":
                index = min(place, len(rest))
            else:
                index = rest.index(other) + (to == "after")  # type: ignore[arg-type]
            rest.insert(index, job_id)
            expected = rest != order
            order[:] = rest
        placement = Placement(to, other=other, place=place)  # type: ignore[arg-type]
        results = self.on_stores(lambda store: store.reorder(job_id, placement))
        assert [_error_kind(r) for r in results] == self.each(expected), (job_id, placement)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """An abort ends a waiting job; an active one frees its slot for the first holding."""
        model = self.model
        job_id = self.pick(data, "job")
        state = model.states.get(job_id)
        expected: object
        if state is None:
            expected = JobNotFound
        elif state.is_final:
            expected = IllegalTransition
        elif job_id in model.running:
            expected = state
            model.aborting.add(job_id)
        else:
            expected = State.ABORTED
            model.end(job_id, State.ABORTED)
        results = self.on_stores(lambda store: store.request_abort(job_id, NOW))
        assert [_error_kind(r) for r in results] == self.each(expected), job_id

    @rule(tenant=st.sampled_from(TENANTS))
    def claim(self, tenant: str) -> None:
        """A claim takes the tenant's oldest admitted (QUEUED) batch job."""
        model = self.model
        queued = [j for j in model.active.get(tenant, []) if j not in model.running]
        results = self.on_stores(
            lambda store: store.claim(OWNER, {tenant: 1}, {"batch"}, NOW, NOW + 1e6)
        )
        expected = queued[:1]
        for claimed in results:
            assert [job.id for job in claimed] == expected
        for job_id in expected:
            model.running.add(job_id)
            model.states[job_id] = State.PREPARING

    @rule(data=st.data())
    def prepared(self, data: st.DataObject) -> None:
        """A claimed batch job moves on to PROCESSING once its start committed (at once, if
        an earlier attempt's did)."""
        model = self.model
        preparing = sorted(j for j in model.running if model.states[j] is State.PREPARING)
        if not preparing:
            return
        job_id = data.draw(st.sampled_from(preparing), label="preparing")

        async def prepare(store: Store) -> str:
            counts = await store.begin_batch(OWNER, job_id)
            assert counts is not None
            if counts.prepared:  # an earlier attempt's start committed: it resumes
                return "resumed"
            assert await store.end_preparing(OWNER, job_id, 0, 0)
            return "prepared"

        expected = "resumed" if job_id in model.prepared else "prepared"
        assert self.on_stores(prepare) == self.each(expected)
        model.prepared.add(job_id)
        model.states[job_id] = State.PROCESSING

    @rule(data=st.data(), state=st.sampled_from([State.COMPLETED, State.FAILED, State.ABORTED]))
    def finish(self, data: st.DataObject, state: State) -> None:
        """A running batch job that ends frees its slot: the first holding job is admitted."""
        model = self.model
        # Only a batch whose chunks ran (PROCESSING) completes; start may fail or abort.
        running = sorted(
            j for j in model.running if state is not State.COMPLETED
            or model.states[j] is State.PROCESSING
        )  # fmt: skip
        if not running:
            return
        job_id = data.draw(st.sampled_from(running), label="running")
        results = self.on_stores(lambda store: store.report(OWNER, [Outcome(job_id, state)], NOW))
        assert results == self.each([job_id])
        model.end(job_id, state)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A running batch job released at shutdown goes back to QUEUED and keeps its slot
        (or ends ABORTED if its abort was requested)."""
        model = self.model
        if not model.running:
            return
        job_id = data.draw(st.sampled_from(sorted(model.running)), label="running")
        outcome = Outcome(job_id, State.QUEUED, release=True)
        results = self.on_stores(lambda store: store.report(OWNER, [outcome], NOW))
        assert results == self.each([job_id])
        if job_id in model.aborting:
            model.end(job_id, State.ABORTED)
        else:
            model.running.discard(job_id)
            model.states[job_id] = State.QUEUED

    # -- what must hold after every step ----------------------------------------------------

    @invariant()
    def stores_agree_with_the_model(self) -> None:
        model = self.model
        for tenant in TENANTS:
            orders = self.on_stores(partial(_holding_order, tenant=tenant))
            assert orders == self.each(model.holding.get(tenant, [])), tenant
            usage = (len(model.holding.get(tenant, [])), len(model.active.get(tenant, [])))
            assert self.on_stores(partial(_usage, tenant=tenant)) == self.each(usage), tenant
        infos = self.on_stores(lambda store: store.get_many(model.created))
        for found in infos:
            assert {info.id: info.state for info in found} == model.states


async def _holding_order(store: Store, *, tenant: str) -> list[str]:
    return await store.holding_order(tenant)


async def _usage(store: Store, *, tenant: str) -> tuple[int, int]:
    return await store.usage(tenant)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("backend", "options"),
    [
        pytest.param("asyncio", {"debug": True}, id="asyncio"),
        pytest.param("trio", {}, id="trio"),
    ],
)
def test_holding_queues_follow_a_list_model(
    backend: str, options: dict[str, object], tmp_path: Path
) -> None:
    """Random enqueues, moves, aborts, claims and ends keep every store's holding queues and
    slots where a plain list model puts them."""
    examples = int(os.environ.get("FLEXQ_MODEL_EXAMPLES", "40"))
    runs = itertools.count()
    with start_blocking_portal(backend, options) as portal:

        class Machine(HoldingQueues):
            def __init__(self) -> None:
                super().__init__(portal, str(tmp_path / f"holding-{next(runs)}.db"))

        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
