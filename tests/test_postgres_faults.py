"""The database connection failing at chosen moments: during a claim, a report of outcomes, a
lease renewal, and under the LISTEN connection. Nothing is lost, nothing stays stuck, and no
job runs twice at once.

The moments are chosen without touching flexq: a trigger in the test's schema makes the
statement of interest wait for an advisory lock that the test holds, the test finds that
statement in ``pg_stat_activity``, breaks its connection (``pg_terminate_backend`` on the
server's side, or a TCP proxy that cuts it on the client's side), and lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
import pytest
from anyio.abc import SocketAttribute

import flexq
from flexq import FlexqError, State, StoreError
from flexq._store import postgres as postgres_store
from flexq._store.base import Outcome
from flexq._store.postgres import PostgresStore

from .conftest import POSTGRES_DSN, make_queue, postgres_url
from .test_postgres import sql, terminate
from .test_queue import TAKE_LEASE, check_a_job_whose_lease_is_taken_is_stopped
from .test_store_conformance import OWNER, T0, TASKS, job, put

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

CONDITIONS = {
    "claim": "OLD.state = 'QUEUED' AND NEW.state IN ('PREPARING', 'PROCESSING')",
    "report": "OLD.lease_owner IS NOT NULL AND NEW.lease_owner IS NULL"
    " AND NEW.lease_expiries = OLD.lease_expiries",
    "renew": "OLD.lease_owner = NEW.lease_owner AND OLD.lease_until <> NEW.lease_until",
}
"""Which updates of a job's row each hold waits on (a recovery adds a lease expiry)."""

STATEMENTS = {
    "claim": "%candidates AS%",
    "report": "%release, retry, final%",
    "renew": "%SET lease_until = %",
    "edges": "%INSERT INTO%flexq_dependencies%",
}
"""How the statement of each moment reads in ``pg_stat_activity``."""


@dataclasses.dataclass(frozen=True)
class Blocked:
    pid: int
    client_port: int


class Holds:
    """Makes chosen updates of the schema's jobs wait until :meth:`release` (or the end)."""

    def __init__(self, schema: str, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
        self.schema = schema
        self._admin = admin
        self._key = f"flexq-faults.{schema}"
        self._admin.execute(
            f"""CREATE FUNCTION "{schema}".hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock_shared(hashtextextended('{self._key}', 0));
                RETURN NEW;
            END $$"""
        )

    def hold(self, moment: str) -> None:
        """From now on, the updates of ``moment`` wait (for "edges": the dependencies that
        new jobs add)."""
        if moment == "edges":
            self._admin.execute(
                f'CREATE TRIGGER hold_edges BEFORE INSERT ON "{self.schema}".flexq_dependencies'
                f' FOR EACH ROW EXECUTE FUNCTION "{self.schema}".hold()'
            )
        else:
            self._admin.execute(
                f'CREATE TRIGGER hold_{moment} BEFORE UPDATE ON "{self.schema}".flexq_jobs'
                f" FOR EACH ROW WHEN ({CONDITIONS[moment]})"
                f' EXECUTE FUNCTION "{self.schema}".hold()'
            )
        self._admin.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (self._key,))

    def release(self) -> None:
        """Let the waiting updates (and later ones) go on."""
        self._admin.execute("SELECT pg_advisory_unlock_all()")

    async def blocked(self, moment: str, timeout: float = 10.0) -> Blocked:
        """The flexq connection whose statement of ``moment`` waits, once one does."""
        with anyio.fail_after(timeout):
            while True:
                rows = sql(
                    "SELECT pid, client_port FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'flexq'"
                    " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                    " AND query LIKE %s AND query LIKE %s",
                    STATEMENTS[moment],
                    f'%"{self.schema}".flexq_%',
                )
                if rows:
                    pid, port = rows[0]
                    return Blocked(int(str(pid)), int(str(port)))
                await anyio.sleep(0.02)


@pytest.fixture
def holds(pg_schema: str) -> Iterator[Callable[[], Holds]]:
    """Makes :class:`Holds` for the test's schema, once its tables exist (its connection
    closes at the end, which lets everything go on)."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        yield lambda: Holds(pg_schema, admin)


class Proxy:
    """A TCP proxy in front of the test server that can cut the connections through it."""

    def __init__(self) -> None:
        parsed = urllib.parse.urlsplit(POSTGRES_DSN)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 5432)
        self._scopes: dict[int, anyio.CancelScope] = {}
        """The connections through it, by the port the server sees each come from."""
        self._answers_cut: set[int] = set()
        self.port = 0
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self._counted = anyio.Event()

    async def counted(self, check: Callable[[], bool]) -> None:
        """Wait until ``check()`` holds, looking again at each connection accepted or refused."""
        while not check():
            self._counted = anyio.Event()
            await self._counted.wait()

    def url(self, schema: str) -> str:
        parsed = urllib.parse.urlsplit(postgres_url(schema))
        return parsed._replace(netloc=f"{parsed.username}@127.0.0.1:{self.port}").geturl()

    def cut(self, client_port: int | None = None) -> None:
        """Close the connection the server sees coming from ``client_port`` (or all of them)
        on both sides at once."""
        for port, scope in list(self._scopes.items()):
            if client_port in (None, port):
                scope.cancel()

    def cut_answer(self, client_port: int) -> None:
        """Drop what the server sends next on that connection, and close it."""
        self._answers_cut.add(client_port)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self.refusing:
                self.refused += 1
                self._counted.set()
                return
            self.accepted += 1
            self._counted.set()
            async with await anyio.connect_tcp(*self._upstream) as server:
                port = server.extra(SocketAttribute.local_port)
                with anyio.CancelScope() as self._scopes[port]:
                    async with anyio.create_task_group() as group:
                        group.start_soon(self._pump, client, server, None, group.cancel_scope)
                        group.start_soon(self._pump, server, client, port, group.cancel_scope)
                del self._scopes[port]

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        answers_of: int | None,
        scope: anyio.CancelScope,
    ) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for data in source:
                if answers_of in self._answers_cut:
                    break
                await sink.send(data)
        scope.cancel()


@contextlib.asynccontextmanager
async def running_proxy() -> AsyncIterator[Proxy]:
    proxy = Proxy()
    async with anyio.create_task_group() as group:
        await group.start(proxy.serve)
        try:
            yield proxy
        finally:
            group.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def producer_of(url: str, task: str) -> AsyncIterator[flexq.Queue]:
    """A queue that only enqueues ``task``: it has no dispatcher, so its enqueues never claim
    in their own transaction, and the claim that a test holds is the workers'."""
    producer = make_queue(url)

    @producer.task(name=task)
    async def never(*args: Any) -> None:
        raise AssertionError("the producer runs nothing")

    await producer.open()
    try:
        yield producer
    finally:
        await producer.close()


def probe_queue(url: str, **options: Any) -> tuple[flexq.Queue, list[int]]:
    """A queue whose task "probe" returns its argument, and the arguments it ran with."""
    queue = make_queue(url, **options)
    runs: list[int] = []

    @queue.task(name="probe")
    async def probe(n: int) -> int:
        runs.append(n)
        return n

    return queue, runs


def job_row(schema: str, job_id: str) -> tuple[Any, ...]:
    (row,) = sql(
        f'SELECT state, lease_owner IS NOT NULL, attempts FROM "{schema}".flexq_jobs WHERE id = %s',
        job_id,
    )
    return row


async def test_a_claim_whose_backend_is_terminated_is_made_again(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """The server ends the connection of a claim while it waits: the claim is rolled back and
    made again, and the job runs once, its first attempt."""
    queue, runs = probe_queue(postgres_url(pg_schema), workers=2)

    async with queue, producer_of(postgres_url(pg_schema), "probe") as producer:
        faults = holds()
        faults.hold("claim")
        job_id = await producer.enqueue("probe", 1)
        blocked = await faults.blocked("claim")
        terminate({blocked.pid})
        faults.release()
        info = await queue.wait(job_id, timeout=20)
    assert (info.state, info.result, info.attempts, info.errors) == (State.COMPLETED, 1, 1, ())
    assert runs == [1]


async def test_a_claim_whose_answer_is_lost_is_recovered_not_held_for_ever(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """The connection of a claim is closed after the claim committed and before its answer
    arrived: the job is PROCESSING under this process's lease, which its runner never heard
    of. The process does not renew that lease, so the job is recovered when it expires and
    runs, once."""
    async with running_proxy() as proxy:
        queue, runs = probe_queue(proxy.url(pg_schema), workers=2, lease=1.0)

        async with queue, producer_of(postgres_url(pg_schema), "probe") as producer:
            faults = holds()
            faults.hold("claim")
            job_id = await producer.enqueue("probe", 1)
            blocked = await faults.blocked("claim")
            proxy.cut_answer(blocked.client_port)
            faults.release()
            with anyio.move_on_after(0.8):  # before the lease of 1 s expires
                while True:  # the server commits the claim on its own time
                    if job_row(pg_schema, job_id) == ("PROCESSING", True, 1):
                        break
                    await anyio.sleep(0.02)
            assert job_row(pg_schema, job_id) == ("PROCESSING", True, 1), "the claim was undone"
            assert runs == []
            info = await queue.wait(job_id, timeout=20)
    assert (info.state, info.result, info.attempts) == (State.COMPLETED, 1, 2)
    assert [error.type for error in info.errors] == ["flexq.LeaseExpired"]
    assert runs == [1]


@pytest.mark.parametrize("fault", ["terminated", "closed"])
async def test_a_report_whose_connection_breaks_is_written_later(
    pg_schema: str, holds: Callable[[], Holds], fault: str
) -> None:
    """The connection of a report of outcomes breaks while the report waits (terminated by
    the server, or closed under the client): the report is tried again, and the job ends
    COMPLETED with its result, run once."""
    async with running_proxy() as proxy:
        queue, runs = probe_queue(proxy.url(pg_schema), workers=2)

        async with queue:
            faults = holds()
            faults.hold("report")
            job_id = await queue.enqueue("probe", 7)
            blocked = await faults.blocked("report")
            if fault == "terminated":
                terminate({blocked.pid})
            else:
                proxy.cut(blocked.client_port)
            await anyio.sleep(0.1)
            faults.release()
            info = await queue.wait(job_id, timeout=20)
            store = queue._store
            assert isinstance(store, PostgresStore)
            assert blocked.pid not in store.backend_pids, "the broken connection was kept"
    assert (info.state, info.result, info.attempts, info.errors) == (State.COMPLETED, 7, 1, ())
    assert runs == [7]


async def test_while_reports_wait_a_process_holds_at_most_twice_its_workers_jobs(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """Outcomes that cannot be written keep their jobs under this process's lease, so a crash
    would run them again: the process takes no more jobs once it holds twice its workers'
    (those running and as many unwritten), and takes the rest once the reports go through."""
    workers, total = 4, 40
    queue, runs = probe_queue(postgres_url(pg_schema), workers=workers)

    async with queue, producer_of(postgres_url(pg_schema), "probe") as producer:
        faults = holds()
        faults.hold("report")
        ids = await producer.enqueue_many([flexq.Call("probe", n) for n in range(total)])
        try:
            await faults.blocked("report")
            await anyio.sleep(1.0)  # time enough to run all 40 if nothing held them back
            (held,) = sql(
                f'SELECT count(*) FROM "{pg_schema}".flexq_jobs WHERE lease_owner IS NOT NULL'
            )
        finally:
            faults.release()  # else the queue could not close
        assert len(runs) == 2 * workers
        assert held == (2 * workers,)
        infos = [await queue.wait(job_id, timeout=20) for job_id in ids]
    assert [info.state for info in infos] == [State.COMPLETED] * total
    assert sorted(runs) == list(range(total))


async def test_a_dependant_added_as_its_parent_completes_is_released(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """A dependant is enqueued in the moment its parent completes: the parent's report waits
    for the enqueue's lock on the parent, then finds that the parent has a dependant now and
    releases it in the same transaction, so the dependant runs instead of waiting for ever."""
    queue = make_queue(postgres_url(pg_schema), workers=2)
    started, go = anyio.Event(), anyio.Event()
    runs: list[str] = []

    @queue.task(name="parent")
    async def parent() -> None:
        started.set()
        await go.wait()

    @queue.task(name="child")
    async def child() -> None:
        runs.append("child")

    children: list[str] = []
    child_added = anyio.Event()

    async def add_child(parent_id: str) -> None:
        children.append(await queue.enqueue(child, depends_on=[parent_id]))
        child_added.set()

    async with queue, anyio.create_task_group() as group:
        parent_id = await queue.enqueue(parent)
        await started.wait()
        faults = holds()
        faults.hold("edges")
        try:
            group.start_soon(add_child, parent_id)
            await faults.blocked("edges")  # the parent is locked and marked, the edge waits
            go.set()
            with anyio.fail_after(10):  # the report of its completion waits for the lock
                while True:
                    if sql(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'flexq'"
                        " AND wait_event_type = 'Lock' AND query LIKE %s",
                        f'%"{pg_schema}".flexq_jobs%has_dependants%',
                    ):
                        break
                    await anyio.sleep(0.02)
        finally:
            faults.release()
        parent_info = await queue.wait(parent_id, timeout=10)
        with anyio.fail_after(10):
            await child_added.wait()
        child_info = await queue.wait(children[0], timeout=10)
    assert (parent_info.state, child_info.state) == (State.COMPLETED, State.COMPLETED)
    assert runs == ["child"]


async def test_a_renewal_whose_backend_is_terminated_keeps_the_lease(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """A lease renewal fails once (its backend terminated) while a job outlasts its lease:
    the next renewal holds the lease, and the job runs once, to its end."""
    queue = make_queue(postgres_url(pg_schema), workers=2, lease=1.0)
    events: list[str] = []

    @queue.task(name="long")
    async def long() -> None:
        events.append("start")
        await anyio.sleep(2.0)
        events.append("done")

    async with queue:
        faults = holds()
        faults.hold("renew")
        job_id = await queue.enqueue(long)
        terminate({(await faults.blocked("renew")).pid})
        faults.release()
        info = await queue.wait(job_id, timeout=20)
    assert (info.state, info.attempts, info.errors) == (State.COMPLETED, 1, ())
    assert events == ["start", "done"]


async def test_a_job_whose_lease_could_not_be_renewed_is_stopped_not_run_twice_at_once(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """Every renewal of a running job's lease fails for longer than the lease (its backend is
    terminated each time), in either of two processes: the process stops the job before the
    lease runs out and hands it back, so it never runs in both at once. Once renewals work
    again, the job runs to its end."""
    url = postgres_url(pg_schema)
    queues = {name: make_queue(url, workers=1, lease=1.0) for name in ("a", "b")}
    events: list[tuple[str, str]] = []

    for name, queue in queues.items():

        @queue.task(name="long")
        async def long(name: str = name) -> None:
            events.append(("start", name))
            try:
                await anyio.sleep(2.0)
            except anyio.get_cancelled_exc_class():
                events.append(("stopped", name))
                raise
            events.append(("done", name))

    async with queues["a"], queues["b"]:
        faults = holds()
        faults.hold("renew")
        job_id = await queues["a"].enqueue("long")
        with anyio.move_on_after(1.6):  # longer than the lease
            while True:
                terminate({(await faults.blocked("renew")).pid})
        faults.release()
        info = await queues["a"].wait(job_id, timeout=20)
    assert info.state is State.COMPLETED
    assert ("stopped", events[0][1]) in events, "no run was stopped"
    running = None
    for event, name in events:
        assert running == (None if event == "start" else name), f"ran twice at once: {events}"
        running = name if event == "start" else None
    assert [event for event, _ in events].count("done") == 1


async def test_a_job_whose_lease_another_process_took_is_stopped_not_finished(
    pg_schema: str,
) -> None:
    """A job that another process took over while this one ran it (its lease had expired by
    the other's clock) is stopped here, not run to its end."""

    def take(job_id: str) -> None:
        sql(TAKE_LEASE.format(s=f'"{pg_schema}"', p="%s"), time.time() + 60, job_id)

    await check_a_job_whose_lease_is_taken_is_stopped(postgres_url(pg_schema), take)


async def test_a_job_whose_row_another_transaction_locks_keeps_its_lease(pg_schema: str) -> None:
    """A running job's row stays locked by another transaction for several renewals (which
    skip it): the job is not taken for lost, and runs once, to its end."""
    queue = make_queue(postgres_url(pg_schema), lease=1.0)
    started = anyio.Event()
    ends: list[str] = []

    @queue.task(name="long")
    async def long() -> None:
        started.set()
        try:
            await anyio.sleep(1.5)
        except anyio.get_cancelled_exc_class():
            ends.append("stopped")
            raise
        ends.append("done")

    async with queue:
        job_id = await queue.enqueue(long)
        await started.wait()
        with psycopg.connect(POSTGRES_DSN) as locker:
            locker.execute(
                f'SELECT FROM "{pg_schema}".flexq_jobs WHERE id = %s FOR UPDATE', (job_id,)
            )
            await anyio.sleep(0.8)  # over two renewals, less than the lease
            locker.rollback()
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.attempts, info.errors) == (State.COMPLETED, 1, ())
    assert ends == ["done"]


async def test_a_job_enqueued_while_the_listen_connection_is_down_starts_when_it_returns(
    pg_schema: str,
) -> None:
    """Every connection of an idle worker queue (polling once a minute) is cut and refused for
    a while; another queue enqueues meanwhile, and its notification reaches nobody. Once the
    connections are let through, the LISTEN connection comes back and wakes the dispatcher:
    the job starts within seconds, not at the next poll."""
    async with running_proxy() as proxy:
        worker = make_queue(proxy.url(pg_schema), poll_interval=60.0)
        producer = make_queue(postgres_url(pg_schema))
        started = anyio.Event()

        for queue in (worker, producer):

            @queue.task(name="probe")
            async def probe() -> None:
                started.set()

        listening = f'LISTEN "flexq_{pg_schema}"'
        async with worker:
            await producer.open()
            try:
                await anyio.sleep(0.3)  # the worker's first poll is over: it sleeps a minute
                (before,) = sql("SELECT pid FROM pg_stat_activity WHERE query = %s", listening)
                proxy.refusing = True
                proxy.cut()
                await producer.enqueue("probe")
                await anyio.sleep(0.5)
                assert not started.is_set()
                proxy.refusing = False
                with anyio.fail_after(10):  # reconnections back off; the poll is a minute away
                    await started.wait()
                after = sql("SELECT pid FROM pg_stat_activity WHERE query = %s", listening)
            finally:
                await producer.close()
    assert len(after) == 1
    assert after != [before], "the LISTEN connection was not reopened"


async def test_the_listen_backoff_starts_again_after_a_connection_that_held(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconnections of the LISTEN connection back off while they fail; once one has listened
    for a while (LISTEN_STEADY), the next loss is retried after the shortest pause again, not
    after the longest pause reached before."""
    monkeypatch.setattr(postgres_store, "LISTEN_STEADY", 0.5)
    low, _ = postgres_store.LISTEN_BACKOFF
    async with running_proxy() as proxy:
        store = make_queue(proxy.url(pg_schema))._store
        assert isinstance(store, PostgresStore)
        await store.open()
        reconnected = anyio.Event()

        def wake(tenants: list[str] | None, run_at: float | None) -> None:
            if tenants is None:
                reconnected.set()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(store.listen, wake, lambda: 0)
                with anyio.fail_after(5):
                    await proxy.counted(lambda: proxy.accepted > 0)
                proxy.refusing = True
                proxy.cut()
                with anyio.fail_after(10):  # pauses of 0.1, 0.2, 0.4 and 0.8 s between them
                    await proxy.counted(lambda: proxy.refused >= 5)
                proxy.refusing = False
                with anyio.fail_after(10):
                    await reconnected.wait()
                await anyio.sleep(0.8)  # listening longer than LISTEN_STEADY
                reconnected = anyio.Event()
                cut_at = anyio.current_time()
                proxy.cut()
                with anyio.fail_after(10):
                    await reconnected.wait()
                reconnected_after = anyio.current_time() - cut_at
                group.cancel_scope.cancel()
        finally:
            await store.close()
    assert reconnected_after < low + 0.4, "the backoff went on from its last pause"


async def test_notifications_that_come_during_the_listen_ping_are_delivered(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LISTEN connection pings the server when it has heard nothing for LISTEN_PING
    seconds; a notification that comes while the ping runs is delivered at once, not when the
    next one comes. (Pinging all the time here makes that likely for some of them.)"""
    monkeypatch.setattr(postgres_store, "LISTEN_PING", 0.001)
    store = make_queue(postgres_url(pg_schema))._store
    assert isinstance(store, PostgresStore)
    await store.open()
    heard: list[str] = []
    arrived = anyio.Event()

    def wake(tenants: list[str] | None, run_at: float | None) -> None:
        heard.extend(tenants or ())
        arrived.set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(store.listen, wake, lambda: 0)
            await anyio.sleep(0.3)
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as sender:
                for n in range(30):
                    arrived = anyio.Event()
                    payload = json.dumps({"tenants": [f"t{n}"], "run_at": None})
                    sender.execute("SELECT pg_notify(%s, %s)", (store.channel, payload))
                    with anyio.fail_after(1, shield=True):
                        while f"t{n}" not in heard:
                            await arrived.wait()
                            arrived = anyio.Event()
            group.cancel_scope.cancel()
    finally:
        await store.close()
    assert heard == [f"t{n}" for n in range(30)]


async def test_connection_attempts_back_off_while_the_server_is_unreachable(
    pg_schema: str,
) -> None:
    """While every connection is refused, calls fail with StoreError, and the store tries to
    connect now and then, not for every call; once connections go through, calls work again."""
    async with running_proxy() as proxy:
        queue = make_queue(proxy.url(pg_schema))
        await queue.open()
        try:
            proxy.refusing = True
            proxy.cut()
            for _ in range(40):  # each a read, tried up to three times
                with pytest.raises(StoreError):
                    await queue.counts()
            assert 1 <= proxy.refused <= 10, f"{proxy.refused} attempts to connect for 40 calls"
            proxy.refusing = False
            with anyio.fail_after(10):
                while True:
                    with contextlib.suppress(StoreError):
                        assert sum((await queue.counts()).values()) == 0
                        break
                    await anyio.sleep(0.05)
        finally:
            await queue.close()


@contextlib.asynccontextmanager
async def report_held(
    schema: str, holds: Callable[[], Holds], **options: Any
) -> AsyncIterator[tuple[PostgresStore, Holds]]:
    """An open store holding job "a" under :data:`OWNER`'s lease, whose report will wait until
    the holds are released."""
    store = PostgresStore(POSTGRES_DSN, schema=schema, **options)
    await store.open()
    try:
        await put(store, job("a"))
        assert [c.id for c in await store.claim(OWNER, {"acme": 1}, TASKS, T0, T0 + 60)] == ["a"]
        faults = holds()
        faults.hold("report")
        yield store, faults
    finally:
        await store.close()


async def report_a(store: PostgresStore) -> None:
    """Report job "a" COMPLETED with the result 1."""
    await store.report(OWNER, [Outcome("a", State.COMPLETED, result="1")], T0 + 1)


async def test_a_store_call_whose_caller_is_cancelled_runs_to_its_end(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """Cancelling the caller of a transaction under way does not abandon it half done: the
    caller returns once the transaction has ended, and its writes are there."""
    async with report_held(pg_schema, holds) as (store, faults):
        caller = anyio.CancelScope()
        returned = anyio.Event()

        async def report() -> None:
            with caller:
                await report_a(store)
            returned.set()

        async with anyio.create_task_group() as group:
            group.start_soon(report)
            await faults.blocked("report")
            caller.cancel()
            await anyio.sleep(0.2)
            assert not returned.is_set(), "the caller left its transaction behind"
            faults.release()
        info = await store.get("a")
    assert (info.state, info.result) == (State.COMPLETED, 1)


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_an_asyncio_timeout_around_a_store_call_waits_for_its_transaction(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """asyncio's own cancellation (here ``asyncio.timeout``, which anyio's shields do not
    stop) of a caller whose transaction is under way: the transaction runs to its end before
    the caller gets its TimeoutError."""
    async with report_held(pg_schema, holds) as (store, faults):

        async def release_soon() -> None:
            await faults.blocked("report")
            await anyio.sleep(0.5)
            faults.release()

        async with anyio.create_task_group() as group:
            group.start_soon(release_soon)
            started = anyio.current_time()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await report_a(store)
            assert anyio.current_time() - started >= 0.5, "the caller left its transaction"
        info = await store.get("a")
    assert (info.state, info.result) == (State.COMPLETED, 1)


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_an_enqueue_cancelled_by_asyncio_hands_the_job_it_claimed_to_the_workers(
    pg_schema: str,
) -> None:
    """An idle queue's enqueue claims its job in its own transaction. asyncio's own
    cancellation of that enqueue while the transaction waits (here for a table lock) lets the
    transaction end, and the job it claimed goes to the workers: it runs at once, its first
    attempt, instead of waiting out a lease held by nobody and then running as a suspect."""
    queue = make_queue(postgres_url(pg_schema), poll_interval=30.0, lease=20.0)
    ran = anyio.Event()

    @queue.task(name="probe")
    async def probe() -> None:
        ran.set()

    async with queue:
        await anyio.sleep(0.3)  # the first poll is over: the dispatcher is idle
        locker = await psycopg.AsyncConnection.connect(POSTGRES_DSN)
        try:
            await locker.execute(f'LOCK TABLE "{pg_schema}".flexq_jobs IN SHARE ROW EXCLUSIVE MODE')
            enqueue = asyncio.ensure_future(queue.enqueue("probe"))
            await anyio.sleep(0.2)
            enqueue.cancel()
            await anyio.sleep(0.1)
            await locker.rollback()
        finally:
            await locker.close()
        with pytest.raises(asyncio.CancelledError):
            await enqueue
        with anyio.fail_after(5):
            await ran.wait()
        (job,) = (await queue.jobs()).items
        info = await queue.wait(job.id, timeout=5)
    assert (info.state, info.attempts, info.errors) == (State.COMPLETED, 1, ())


async def test_closing_the_store_waits_for_the_transactions_under_way(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """close() lets a transaction under way end before it closes the connections."""
    closed = False
    async with report_held(pg_schema, holds) as (store, faults):
        async with anyio.create_task_group() as group:
            group.start_soon(report_a, store)
            await faults.blocked("report")

            async def close() -> None:
                nonlocal closed
                await store.close()
                closed = True

            group.start_soon(close)
            await anyio.sleep(0.2)
            assert not closed
            faults.release()
        assert closed
    assert sql(f'SELECT state FROM "{pg_schema}".flexq_jobs') == [("COMPLETED",)]


async def test_calls_waiting_for_a_connection_when_the_store_closes_are_served(
    pg_schema: str, holds: Callable[[], Holds]
) -> None:
    """close() refuses new calls, but a call that already waited for a connection (all of
    them busy) runs before the connections close."""
    async with report_held(pg_schema, holds, connections=1) as (store, faults):
        results: list[object] = []

        async def read() -> None:
            results.append((await store.get("a")).state)

        async with anyio.create_task_group() as group:
            group.start_soon(report_a, store)
            await faults.blocked("report")
            group.start_soon(read)
            await anyio.sleep(0.1)
            group.start_soon(store.close)
            await anyio.sleep(0.1)
            faults.release()
        assert results == [State.COMPLETED]
        with pytest.raises(FlexqError, match="not open"):
            await store.get("a")
