"""What only the PostgreSQL store does: schema and migrations, URLs, wake-ups across processes
through LISTEN/NOTIFY, reconnection after the server dropped a connection, concurrent claims."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

import flexq
from flexq import (
    DuplicateJob,
    FlexqError,
    InvalidArguments,
    JobNotFound,
    LimitExceeded,
    Limits,
    PauseScope,
    State,
    StoreError,
)
from flexq._limits import LimitTable
from flexq._states import Kind
from flexq._store import _pg_migrations as migrations
from flexq._store import postgres as postgres_store
from flexq._store._pg_connections import AsyncConnection, BlockingConnection, run_blocking
from flexq._store.base import (
    ACTIVE_BATCH_STATES,
    ClaimedJob,
    ClaimRequest,
    DependentJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    Outcome,
    Renewal,
)
from flexq._store.postgres import CLAIM_DURABLE, PostgresStore
from flexq._store.url import store_from_url

from .conftest import POSTGRES_DSN, make_queue, postgres_url
from .test_store_conformance import OWNER, T0, TASKS, job, put

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


@pytest.fixture
async def pg_store(pg_schema: str) -> AsyncIterator[PostgresStore]:
    """An open PostgreSQL store in a schema of its own."""
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def sql(query: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own (not the store's)."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def terminate(pids: set[int]) -> None:
    """Kill the server processes of some connections, as an administrator or a restart would."""
    sql("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS p(pid)", sorted(pids))


def test_urls_select_the_postgres_store_with_its_options() -> None:
    """postgresql:// and postgres:// URLs make a PostgresStore; flexq's options are taken out of
    the DSN, libpq's are left in."""
    store = store_from_url("postgresql://u@h:5/db?schema=jobs&connections=2&sslmode=disable")
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.dsn) == ("jobs", "postgresql://u@h:5/db?sslmode=disable")
    other = store_from_url("postgres://u@h/db")
    assert isinstance(other, PostgresStore)
    assert other.schema == "flexq"
    with pytest.raises(InvalidArguments):
        store_from_url("postgresql://h/db?connections=many")


def test_queue_takes_the_schema_as_a_keyword() -> None:
    """flexq.Queue(dsn, schema=...) picks the schema, over the URL's; other stores refuse it."""
    queue = flexq.Queue("postgresql://u@h/db?schema=a", schema="b")
    assert isinstance(queue.store, PostgresStore)
    assert queue.store.schema == "b"
    with pytest.raises(InvalidArguments):
        flexq.Queue("memory://", schema="b")


@pytest.mark.parametrize("schema", ["Upper", "x; DROP TABLE y", "", "a" * 64, "1abc"])
def test_schema_names_must_be_plain_identifiers(schema: str) -> None:
    """A schema name is never pasted into SQL unless it is a plain lower-case identifier."""
    with pytest.raises(InvalidArguments):
        PostgresStore(POSTGRES_DSN, schema=schema)


async def test_open_creates_the_schema_once_and_records_migrations(pg_schema: str) -> None:
    """Opening creates the schema and applies every migration once; stores opened at the same
    time in several connections serialize on the advisory lock and agree."""
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(4)]
    async with anyio.create_task_group() as group:
        for store in stores:
            group.start_soon(store.open)
    for store in stores:
        await store.close()
    rows = sql(f'SELECT version FROM "{pg_schema}".flexq_migrations ORDER BY version')
    assert rows == [(m.version,) for m in migrations.MIGRATIONS]
    reopened = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    await reopened.open()
    await reopened.close()
    assert len(sql(f'SELECT version FROM "{pg_schema}".flexq_migrations')) == len(rows)


async def test_a_newer_schema_is_refused(pg_store: PostgresStore, pg_schema: str) -> None:
    """A schema migrated by a newer flexq is not used by an older one."""
    await pg_store.close()
    newer = migrations.SCHEMA_VERSION + 1
    sql(f"INSERT INTO \"{pg_schema}\".flexq_migrations VALUES (%s, 'future', now())", newer)
    with pytest.raises(FlexqError, match="upgrade flexq"):
        await pg_store.open()


async def test_sql_looking_input_is_stored_as_data(pg_store: PostgresStore) -> None:
    """Tenants, keys and arguments that look like SQL are stored and returned as they were."""
    evil = "x'); DROP TABLE flexq_jobs; --"
    new = job("a", tenant=evil, key=evil)._replace(args='["\\u0000", "%s", "{s}"]')
    await put(pg_store, new)
    info = await pg_store.get("a")
    assert (info.tenant, info.key, info.args) == (evil, evil, ("\x00", "%s", "{s}"))
    assert await pg_store.ready_tenants(TASKS) == [evil]


async def test_nul_in_a_tenant_or_key_is_refused_before_anything_is_written(
    pg_schema: str,
) -> None:
    """PostgreSQL text cannot hold NUL: such a tenant or key is bad input, refused at the call
    (not a StoreError that would fail the other enqueues of its group commit)."""
    queue = make_queue(postgres_url(pg_schema))

    @queue.task(name="t")
    async def t() -> None:
        pass

    async with queue:
        with pytest.raises(InvalidArguments):
            await queue.enqueue(t, tenant="a\x00b")
        with pytest.raises(InvalidArguments):
            await queue.enqueue(t, key="k\x00")
        assert sum((await queue.counts()).values()) == 0


async def test_store_calls_fail_while_the_server_is_unreachable(pg_schema: str) -> None:
    """A database that cannot be reached is a StoreError, with the driver's error as cause."""
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", schema=pg_schema)
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


async def test_store_reconnects_after_its_connections_were_terminated(
    pg_store: PostgresStore,
) -> None:
    """Idle connections killed by the server are replaced before the next call: nothing fails,
    not even writes (which are never tried twice)."""
    await put(pg_store, job("a"), job("b"))
    pids = set(pg_store.backend_pids)
    assert pids
    terminate(pids)
    await anyio.sleep(0.2)  # the server closes them on its own time
    for n in range(8):
        await put(pg_store, job(f"c{n}"))
    assert pg_store.backend_pids - pids, "no connection was replaced"


async def tcp_settings(conn: AsyncConnection | BlockingConnection) -> tuple[int, int, int]:
    """Keepalive on, its idle time (s), and the user timeout (ms) of a connection's socket."""
    raw = conn.connection if isinstance(conn, BlockingConnection) else conn
    sock = socket.socket(fileno=raw.fileno())
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
    finally:
        sock.detach()


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", (1, 10, 30_000)), ("&keepalives_idle=3&tcp_user_timeout=5000", (1, 3, 5_000))],
)
async def test_connections_give_up_on_a_silent_server_within_seconds(
    pg_schema: str, query: str, expected: tuple[int, int, int]
) -> None:
    """The store's TCP connections probe an idle server and bound unacknowledged writes, so
    a server cut off without a word fails their calls (and the lease guard stops the jobs)
    instead of hanging them for hours; settings in the URL win over flexq's."""
    store = store_from_url(postgres_url(pg_schema) + query)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        assert await store._run(tcp_settings) == expected
    finally:
        await store.close()


async def test_connections_numbered_past_1023_work(pg_schema: str) -> None:
    """A busy application holds many files and sockets, so the store's connections get
    descriptors past 1023 (which ``select()`` refuses): enqueues, claims, reports and the
    LISTEN connection work all the same."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this system allows {hard} open files per process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        queue = make_queue(postgres_url(pg_schema))

        @queue.task(name="probe")
        async def probe(n: int) -> int:
            return n

        async with queue:
            job_ids = [await queue.enqueue("probe", n) for n in range(20)]
            for n, job_id in enumerate(job_ids):
                info = await queue.wait(job_id, timeout=10)
                assert (info.state, info.result) == (State.COMPLETED, n)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_schema_names_are_as_long_as_their_notification_channel_allows(
    pg_schema: str,
) -> None:
    """A schema name of 57 characters works, notifications included (its channel,
    ``flexq_<schema>``, has PostgreSQL's 63); a longer one is refused before anything is made."""
    longest = (pg_schema + "_" * 57)[:57]
    too_long = longest + "x"
    with pytest.raises(flexq.InvalidArguments, match="at most 57 characters"):
        flexq.Queue(POSTGRES_DSN, schema=too_long)
    try:
        producer, worker = make_queue(postgres_url(longest)), make_queue(postgres_url(longest))
        for queue in (producer, worker):

            @queue.task(name="probe")
            async def probe() -> None:
                pass

        async with worker:
            await producer.open()
            try:
                job_id = await producer.enqueue("probe")  # notifies the worker's process
                assert (await worker.wait(job_id, timeout=10)).state is State.COMPLETED
            finally:
                await producer.close()
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{longest}" CASCADE')
    assert sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", too_long) == []


async def test_a_key_raced_by_two_stores_is_taken_once(pg_schema: str) -> None:
    """Two processes enqueueing the same key at once: one job is created, the other caller
    learns its id."""
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(2)]
    for store in stores:
        await store.open()
    results: list[object] = []

    async def enqueue(store: PostgresStore, job_id: str) -> None:
        for attempt in range(20):
            (result,) = await store.enqueue(
                [flexq.abc.EnqueueUnit([job(f"{job_id}{attempt}", key=f"k{attempt}")], "raise")],
                T0,
            )
            results.append(result)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(enqueue, stores[0], "a")
            group.start_soon(enqueue, stores[1], "b")
    finally:
        for store in stores:
            await store.close()
    created = [r for r in results if isinstance(r, list)]
    duplicates = [r for r in results if isinstance(r, DuplicateJob)]
    assert (len(created), len(duplicates)) == (20, 20)
    assert {d.existing_id for d in duplicates} == {r[0] for r in created}


async def test_concurrent_claims_never_take_the_same_job(pg_schema: str) -> None:
    """Several stores claiming at once share the jobs out: each job is claimed exactly once."""
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(3)]
    for store in stores:
        await store.open()
    await put(stores[0], *(job(f"j{i}", tenant=f"t{i % 3}") for i in range(300)))
    claimed: list[str] = []

    async def drain(store: PostgresStore, owner: str) -> None:
        while True:
            jobs = await store.claim(owner, {"t0": 7, "t1": 7, "t2": 7}, TASKS, T0, T0 + 10)
            if not jobs:
                return
            claimed.extend(j.id for j in jobs)

    try:
        async with anyio.create_task_group() as group:
            for n, store in enumerate(stores):
                group.start_soon(drain, store, f"{OWNER}-{n}")
    finally:
        for store in stores:
            await store.close()
    assert sorted(claimed) == sorted(f"j{i}" for i in range(300))


async def test_enqueue_in_another_process_wakes_idle_workers(pg_schema: str) -> None:
    """A queue that polls once a minute still starts another process's job at once: the
    enqueue's NOTIFY wakes it (the producer is a separate store, as another process is)."""
    url = postgres_url(pg_schema)
    worker = make_queue(url, poll_interval=60.0)
    producer = make_queue(url)
    started = anyio.Event()

    for queue in (worker, producer):

        @queue.task(name="probe")
        async def probe() -> None:
            started.set()

    async with worker:
        await producer.open()
        try:
            await anyio.sleep(0.2)  # the worker's first poll is over: it sleeps for a minute
            with anyio.fail_after(10):
                await producer.enqueue("probe")
                await started.wait()
        finally:
            await producer.close()


async def test_listen_connection_is_reopened_after_it_was_terminated(pg_schema: str) -> None:
    """A LISTEN connection that the server dropped is reopened, and wake-ups resume."""
    url = postgres_url(pg_schema)
    worker = make_queue(url, poll_interval=60.0)
    producer = make_queue(url)
    runs: list[int] = []
    ran = anyio.Event()

    for queue in (worker, producer):

        @queue.task(name="probe")
        async def probe(n: int) -> None:
            runs.append(n)
            ran.set()

    async with worker:
        await producer.open()
        try:
            await anyio.sleep(0.2)
            listeners = sql(
                "SELECT pid FROM pg_stat_activity WHERE query = %s",
                f'LISTEN "flexq_{pg_schema}"',
            )
            assert len(listeners) == 1
            terminate({int(str(pid)) for (pid,) in listeners})
            await anyio.sleep(1.0)  # the listener notices and reconnects (backoff from 0.1 s)
            for n in range(3):
                ran = anyio.Event()
                with anyio.fail_after(10):
                    await producer.enqueue("probe", n)
                    await ran.wait()
        finally:
            await producer.close()
    assert runs == [0, 1, 2]


async def test_jobs_complete_while_the_server_keeps_killing_connections(pg_schema: str) -> None:
    """Every connection of a running queue is terminated again and again while it works: calls
    fail and are retried, connections are reopened, and every job ends COMPLETED."""
    queue = make_queue(postgres_url(pg_schema), workers=8)

    @queue.task(name="nap")
    async def nap(n: int) -> int:
        await anyio.sleep(0.01)
        return n

    async with queue:
        ids = await queue.enqueue_many([flexq.Call(nap, n) for n in range(600)])
        store = queue.store
        assert isinstance(store, PostgresStore)
        for _ in range(6):
            await anyio.sleep(0.15)
            listeners = sql(
                "SELECT pid FROM pg_stat_activity WHERE query = %s", f'LISTEN "flexq_{pg_schema}"'
            )
            terminate(store.backend_pids | {int(str(pid)) for (pid,) in listeners})
        with anyio.fail_after(30):
            infos = [await queue.wait(job_id) for job_id in ids]
    assert [(info.state, info.result) for info in infos] == [
        (State.COMPLETED, n) for n in range(600)
    ]


async def open_app_connection(
    kind: str,
) -> psycopg.Connection[tuple[Any, ...]] | psycopg.AsyncConnection[tuple[Any, ...]]:
    """The application's own connection, of a kind that works on the running loop."""
    if kind == "async":
        return await psycopg.AsyncConnection.connect(POSTGRES_DSN)
    return await anyio.to_thread.run_sync(psycopg.connect, POSTGRES_DSN)


async def finish(
    conn: psycopg.Connection[tuple[Any, ...]] | psycopg.AsyncConnection[tuple[Any, ...]],
    how: str,
) -> None:
    """Commit or roll back the application's transaction, and close its connection."""
    if isinstance(conn, psycopg.AsyncConnection):
        await (conn.commit() if how == "commit" else conn.rollback())
        await conn.close()
    else:
        await anyio.to_thread.run_sync(conn.commit if how == "commit" else conn.rollback)
        await anyio.to_thread.run_sync(conn.close)


async def test_enqueue_in_the_applications_transaction(pg_schema: str) -> None:
    """A job enqueued with connection= exists if and only if the application's transaction
    commits; once it does, the NOTIFY sent in it wakes the (slow-polling) workers."""
    await check_enqueue_in_transaction(pg_schema, "sync")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_enqueue_in_an_async_connections_transaction(pg_schema: str) -> None:
    """The same with psycopg's AsyncConnection, which only asyncio can drive."""
    await check_enqueue_in_transaction(pg_schema, "async")


async def check_enqueue_in_transaction(pg_schema: str, kind: str) -> None:
    queue = make_queue(postgres_url(pg_schema), poll_interval=60.0)
    ran: list[int] = []
    done = anyio.Event()

    @queue.task(name="t")
    async def t(n: int) -> None:
        ran.append(n)
        done.set()

    async with queue:
        await anyio.sleep(0.2)  # past the first poll: only a notification wakes the workers
        conn = await open_app_connection(kind)
        dropped = await queue.enqueue(t, 1, connection=conn)
        (kept,) = await queue.enqueue_many([flexq.Call(t, 2)], connection=conn)
        with pytest.raises(JobNotFound):
            await queue.get(kept)  # not committed yet: invisible to everyone else
        await finish(conn, "rollback")
        with pytest.raises(JobNotFound):
            await queue.get(dropped)
        conn = await open_app_connection(kind)
        kept = await queue.enqueue(t, 3, key="k", connection=conn)
        with pytest.raises(DuplicateJob):
            await queue.enqueue(t, 4, key="k", connection=conn)
        await finish(conn, "commit")  # the duplicate left the transaction usable
        with anyio.fail_after(10):
            await done.wait()
        assert (await queue.wait(kept, timeout=10)).state is State.COMPLETED
    assert ran == [3]


@pytest.mark.parametrize(
    ("kind", "anyio_backend"), [("sync", "asyncio"), ("sync", "trio"), ("async", "asyncio")]
)
async def test_batch_jobs_enqueued_in_the_applications_transaction_join_the_holding_queue(
    pg_store: PostgresStore, kind: str
) -> None:
    """Batch jobs written in the application's transaction take a free slot or their place in
    the holding queue when it commits; one that overflows the holding queue is refused and
    leaves the transaction usable."""
    pg_store.set_limits(LimitTable(Limits(max_active_batches=1, max_holding=1)))
    conn = await open_app_connection(kind)
    results = [
        await pg_store.enqueue_in(conn, EnqueueUnit([job(job_id, kind=Kind.BATCH)], "raise"), T0)
        for job_id in ("b1", "b2", "b3")
    ]
    assert results[:2] == [["b1"], ["b2"]]
    assert isinstance(results[2], LimitExceeded)
    assert await pg_store.usage("acme") == (0, 0)  # not committed yet
    await finish(conn, "commit")
    assert await pg_store.usage("acme") == (1, 1)
    assert await pg_store.holding_order("acme") == ["b2"]
    assert (await pg_store.get("b1")).state is State.QUEUED
    counts, errors = await pg_store.batch_summary("b2")
    assert (counts.prepared, errors) == (False, [])
    with pytest.raises(JobNotFound):
        await pg_store.get("b3")


async def test_raising_a_limit_admits_the_holding_batches_of_every_tenant(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission pass after the tenants' slot limit rose admits a holding batch job of each
    of them, a few tenants per transaction (each tenant's lock is held until its transaction
    ends, and the server's lock table is finite)."""
    monkeypatch.setattr(postgres_store, "ADMIT_CHUNK", 2)
    tenants = [f"t{n}" for n in range(5)]
    pg_store.set_limits(LimitTable(Limits(max_active_batches=1)))
    for tenant in tenants:
        unit = EnqueueUnit(
            [job(f"{tenant}-{n}", tenant=tenant, kind=Kind.BATCH) for n in (1, 2)], "raise"
        )
        assert await pg_store.enqueue([unit], T0) == [[f"{tenant}-1", f"{tenant}-2"]]
        assert await pg_store.holding_order(tenant) == [f"{tenant}-2"]
    pg_store.set_limits(LimitTable(Limits(max_active_batches=2)))
    assert await pg_store.admit(T0) == tenants
    for tenant in tenants:
        assert await pg_store.usage(tenant) == (0, 2)  # (holding, active)
        assert (await pg_store.get(f"{tenant}-2")).state is State.QUEUED
    assert await pg_store.admit(T0) == []


async def test_enqueue_with_a_connection_needs_the_postgres_store() -> None:
    """Other stores refuse connection= rather than write outside the caller's transaction."""
    queue = make_queue("memory://")

    @queue.task(name="t")
    async def t() -> None:
        pass

    async with queue:
        with pytest.raises(InvalidArguments):
            await queue.enqueue(t, connection=object())


async def test_two_stores_never_fill_a_sixth_batch_slot(pg_schema: str) -> None:
    """Two stores (two processes' connections) enqueue, claim and complete batch jobs of one
    tenant at once; it never has more than its 5 batch jobs active, and all of them run."""
    limits = LimitTable(Limits(max_active_batches=5, max_holding=1000))
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(2)]
    for store in stores:
        store.set_limits(limits)
        await store.open()
    active = (
        f'SELECT count(*) FROM "{pg_schema}".flexq_jobs'
        " WHERE tenant = 'acme' AND kind = 'batch' AND state = ANY(%s)"
    )
    seen: list[int] = []
    per_store = 100

    async def check(store: PostgresStore) -> None:
        seen.append((await store.usage("acme"))[1])

    async def complete(store: PostgresStore, owner: str, job_id: str) -> None:
        written = await store.report(owner, [Outcome(job_id, State.COMPLETED, "null")], T0)
        assert written == [job_id]
        await check(store)

    async def churn(store: PostgresStore, owner: str) -> None:
        mine: list[str] = []
        for n in range(per_store):
            await put(store, job(f"{owner}-{n}", kind=Kind.BATCH))
            await check(store)
            claimed = await store.claim(owner, {"acme": 5}, TASKS, T0, T0 + 600)
            mine += [c.id for c in claimed]
            while len(mine) > 2:  # keep some slots busy: the limit binds
                await complete(store, owner, mine.pop(0))
        while True:
            mine += [c.id for c in await store.claim(owner, {"acme": 5}, TASKS, T0, T0 + 600)]
            if not mine:
                if (await store.counts(JobFilter(tenant="acme"))).get(State.COMPLETED) == 2 * (
                    per_store
                ):
                    return
                await anyio.sleep(0.01)  # the other store still holds some
                continue
            await complete(store, owner, mine.pop(0))

    async def watch(done: anyio.Event) -> None:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(active, (sorted(ACTIVE_BATCH_STATES),)).fetchone()
                seen.append(row[0] if row else 0)
                await anyio.lowlevel.checkpoint()

    try:
        done = anyio.Event()
        async with anyio.create_task_group() as watching:
            watching.start_soon(watch, done)
            async with anyio.create_task_group() as group:
                group.start_soon(churn, stores[0], "one")
                group.start_soon(churn, stores[1], "two")
            done.set()
        counts = await stores[0].counts(JobFilter(tenant="acme"))
        usage = await stores[1].usage("acme")
    finally:
        for store in stores:
            await store.close()
    assert max(seen) == 5, "the slots never filled up: the test raced nothing"
    assert counts == {State.COMPLETED: 2 * per_store}
    assert usage == (0, 0)


async def test_parents_ended_at_once_in_two_processes_release_their_common_children(
    pg_schema: str,
) -> None:
    """Each child waits for two parents that two stores complete in concurrent reports; every
    child is released (neither report may leave it waiting for the other's parent)."""
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        for round_ in range(5):
            pairs = [(f"a{round_}-{n}", f"b{round_}-{n}") for n in range(40)]
            await put(stores[0], *(job(p) for pair in pairs for p in pair))
            children = [
                DependentJob(job(f"c{round_}-{n}", task="u"), pair) for n, pair in enumerate(pairs)
            ]
            await stores[0].enqueue_dependent(children, T0)
            for side, (store, owner) in enumerate(zip(stores, ("one", "two"), strict=True)):
                ids = [pair[side] for pair in pairs]
                assert len(await store.claim_jobs(owner, ids, {"t"}, T0, T0 + 60)) == len(ids)

            async with anyio.create_task_group() as group:
                for side, owner in enumerate(("one", "two")):
                    outcomes = [Outcome(pair[side], State.COMPLETED, "null") for pair in pairs]
                    group.start_soon(stores[side].report, owner, outcomes, T0)
            infos = await stores[1].get_many([child.job.id for child in children])
            assert {info.state for info in infos} == {State.QUEUED}
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("result", [None, "null"], ids=["one-statement", "general"])
async def test_a_dependant_enqueued_while_its_parent_ends_is_not_left_waiting(
    pg_schema: str, result: str | None
) -> None:
    """One store adds dependants of running jobs while another completes those jobs: each
    dependant either sees its parent ended, or is released by the report that ends it (a
    report of completions without a value is one statement, which must leave a parent to
    the general report)."""
    stores = [PostgresStore(POSTGRES_DSN, schema=pg_schema) for _ in range(2)]
    for store in stores:
        await store.open()
    parents = [f"p{n}" for n in range(60)]
    try:
        await put(stores[0], *(job(p) for p in parents))
        assert len(await stores[1].claim_jobs(OWNER, parents, {"t"}, T0, T0 + 60)) == 60

        async def add_children() -> None:
            for n, parent in enumerate(parents):
                await stores[0].enqueue_dependent(
                    [DependentJob(job(f"c{n}", task="u"), (parent,))], T0
                )

        async def end_parents() -> None:
            for parent in parents:
                await stores[1].report(OWNER, [Outcome(parent, State.COMPLETED, result)], T0)

        async with anyio.create_task_group() as group:
            group.start_soon(add_children)
            group.start_soon(end_parents)
        infos = await stores[0].get_many([f"c{n}" for n in range(60)])
    finally:
        for store in stores:
            await store.close()
    assert {info.state for info in infos} == {State.QUEUED}


async def test_dependants_of_one_parent_enqueued_at_once_all_wait_for_it(pg_schema: str) -> None:
    """Many transactions add dependants of one parent at once: none fails (they take turns at
    the parent's lock instead of deadlocking as their dependencies mark it), and the parent's
    completion releases them all."""
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema, connections=8)
    await store.open()
    try:
        await put(store, job("p"))
        assert len(await store.claim_jobs(OWNER, ["p"], {"t"}, T0, T0 + 60)) == 1
        async with anyio.create_task_group() as group:
            for n in range(40):
                child = DependentJob(job(f"c{n}", task="u"), ("p",))
                group.start_soon(store.enqueue_dependent, [child], T0)
        await store.report(OWNER, [Outcome("p", State.COMPLETED)], T0)
        infos = await store.get_many([f"c{n}" for n in range(40)])
    finally:
        await store.close()
    assert [info.state for info in infos] == [State.QUEUED] * 40


class _CountingStore(PostgresStore):
    """Counts the claims the dispatcher makes, and those made in an enqueue's round trip."""

    claims = 0
    claims_on_enqueue = 0

    async def claim(self, *args: Any) -> list[ClaimedJob]:
        self.claims += 1
        return await super().claim(*args)

    async def enqueue_and_claim(
        self, units: Sequence[EnqueueUnit], now: float, claim: ClaimRequest
    ) -> tuple[list[EnqueueResult], list[ClaimedJob] | None]:
        self.claims_on_enqueue += 1
        return await super().enqueue_and_claim(units, now, claim)


async def test_an_idle_queue_claims_what_it_enqueues_in_the_same_round_trip(
    pg_schema: str,
) -> None:
    """An enqueue into an idle queue claims its job for a free worker in its own transaction:
    the dispatcher makes no claim of its own for it."""
    store = _CountingStore(POSTGRES_DSN, schema=pg_schema)
    queue = make_queue(store, poll_interval=60.0)
    started = anyio.Event()

    @queue.task(name="probe")
    async def probe() -> None:
        started.set()

    async with queue:
        await anyio.sleep(0.2)  # the first poll is over: the dispatcher sleeps for a minute
        before = store.claims
        with anyio.fail_after(10):
            job_id = await queue.enqueue(probe)
            await started.wait()
            assert (await queue.wait(job_id)).state is State.COMPLETED
        assert (store.claims_on_enqueue, store.claims) == (1, before)


async def test_a_claim_made_on_enqueue_obeys_pauses(pg_schema: str) -> None:
    """The claim an idle queue makes as it enqueues skips a paused tenant's job, which waits
    QUEUED until the pause is lifted."""
    store = _CountingStore(POSTGRES_DSN, schema=pg_schema)
    queue = make_queue(store, poll_interval=60.0)

    @queue.task(name="probe")
    async def probe() -> None:
        pass

    async with queue:
        await queue.pause(tenant="t1")
        await anyio.sleep(0.2)
        with anyio.fail_after(10):
            held = await queue.enqueue(probe, tenant="t1")
            assert store.claims_on_enqueue == 1
            free = await queue.enqueue(probe, tenant="t2")
            assert (await queue.wait(free)).state is State.COMPLETED
            assert (await queue.get(held)).state is State.QUEUED
            await queue.resume(tenant="t1")
            assert (await queue.wait(held)).state is State.COMPLETED


def enqueue_claim(tenant: str = "acme", n: int = 4) -> ClaimRequest:
    return ClaimRequest(OWNER, {tenant: n}, TASKS, T0 + 10)


async def test_a_job_enqueued_alone_is_claimed_as_it_is_inserted(pg_store: PostgresStore) -> None:
    """A lone ready job with nothing of its tenant waiting is written already claimed, with
    its first attempt and this owner's lease; the lease renews and the outcome is written."""
    results, claimed = await pg_store.enqueue_and_claim(
        [EnqueueUnit([job("a", priority=2)], "raise")], T0, enqueue_claim()
    )
    assert results == [["a"]]
    assert claimed is not None
    assert [(c.id, c.task, c.tenant, c.attempt, c.args) for c in claimed] == [
        ("a", "t", "acme", 1, "[1]")
    ]
    assert claimed[0].order[0] == -2
    info = await pg_store.get("a")
    assert (info.state, info.attempts, info.started_at) == (State.PROCESSING, 1, info.created_at)
    assert await pg_store.renew(OWNER, ["a"], T0 + 20) == Renewal(aborted=[], lost=[])
    assert await pg_store.report(OWNER, [Outcome("a", State.COMPLETED)], T0 + 1) == ["a"]
    assert (await pg_store.get("a")).state is State.COMPLETED


async def test_a_job_enqueued_behind_others_of_its_tenant_is_left_to_the_claim(
    pg_store: PostgresStore,
) -> None:
    """A lone job whose tenant has jobs waiting for the tasks asked for is written QUEUED and
    claims nothing: the dispatcher's claim then takes the tenant's jobs in their order."""
    await put(pg_store, job("older"))
    results, claimed = await pg_store.enqueue_and_claim(
        [EnqueueUnit([job("newer", priority=5)], "raise")], T0, enqueue_claim(n=1)
    )
    assert (results, claimed) == ([["newer"]], None)
    assert (await pg_store.get("newer")).state is State.QUEUED
    assert [c.id for c in await pg_store.claim(OWNER, {"acme": 2}, TASKS, T0, T0 + 10)] == [
        "newer", "older",
    ]  # fmt: skip


async def test_a_job_enqueued_alone_beside_other_work_is_claimed(pg_store: PostgresStore) -> None:
    """Jobs waiting for another tenant, or for a task the claim does not run, do not keep a
    lone job from being claimed as it is inserted."""
    await put(pg_store, job("other-tenant", tenant="globex"), job("other-task", task="x"))
    _, claimed = await pg_store.enqueue_and_claim(
        [EnqueueUnit([job("a")], "raise")], T0, enqueue_claim()
    )
    assert claimed is not None
    assert [c.id for c in claimed] == ["a"]
    assert (await pg_store.get("other-task")).state is State.QUEUED


async def test_a_job_enqueued_alone_wakes_other_processes_only_if_left_queued(
    pg_store: PostgresStore,
) -> None:
    """With no listener of its own to count free workers, the store tells other processes of
    a lone job it leaves QUEUED, and of none it claimed."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as listener:
        listener.execute(f'LISTEN "{pg_store.channel}"')
        _, claimed = await pg_store.enqueue_and_claim(
            [EnqueueUnit([job("a")], "raise")], T0, enqueue_claim()
        )
        assert claimed is not None
        assert list(listener.notifies(timeout=0.5)) == []
        await put(pg_store, job("waiting"))
        while list(listener.notifies(timeout=0.5)):  # that of the plain enqueue
            pass
        _, claimed = await pg_store.enqueue_and_claim(
            [EnqueueUnit([job("b")], "raise")], T0, enqueue_claim()
        )
        assert claimed is None
        assert ["acme" in note.payload for note in listener.notifies(timeout=2, stop_after=1)] == [
            True
        ]


@pytest.mark.parametrize(
    ("scope", "name"),
    [(PauseScope.QUEUE, ""), (PauseScope.TASK, "t"), (PauseScope.TENANT, "acme")],
)
async def test_a_paused_job_enqueued_alone_is_not_claimed(
    pg_store: PostgresStore, scope: PauseScope, name: str
) -> None:
    """A pause of the queue, of the job's task or of its tenant leaves a lone job QUEUED; a
    pause of another task or tenant does not."""
    await pg_store.set_pause(PauseScope.TASK, "u", True, T0)
    await pg_store.set_pause(PauseScope.TENANT, "globex", True, T0)
    _, claimed = await pg_store.enqueue_and_claim(
        [EnqueueUnit([job("free")], "raise")], T0, enqueue_claim()
    )
    assert claimed is not None
    assert [c.id for c in claimed] == ["free"]
    await pg_store.set_pause(scope, name, True, T0)
    _, claimed = await pg_store.enqueue_and_claim(
        [EnqueueUnit([job("held")], "raise")], T0, enqueue_claim()
    )
    assert claimed is None
    assert (await pg_store.get("held")).state is State.QUEUED


async def test_the_claim_made_on_enqueue_leaves_the_commit_synchronous(
    pg_store: PostgresStore,
) -> None:
    """The claim that shares an enqueue's transaction does not let it commit without waiting
    for the disk, as a claim of its own does."""
    await put(pg_store, job("j1"))
    params = {"tasks": sorted(TASKS), "tenants": ["acme"], "counts": [1], "now": T0,
              "owner": OWNER, "lease_until": T0 + 10}  # fmt: skip
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn, conn.pipeline():
        claimed = conn.execute(pg_store.sql(CLAIM_DURABLE), params)
        setting = conn.execute("SELECT current_setting('synchronous_commit')")
    assert [row[0] for row in claimed.fetchall()] == ["j1"]
    assert setting.fetchall() == [("on",)]


async def test_the_store_runs_on_the_event_loop_under_asyncio_and_on_threads_under_trio(
    pg_schema: str, anyio_backend_name: str
) -> None:
    """Under asyncio the store's connections, the LISTEN one included, are psycopg async
    connections on the event loop (no thread of the store's); under trio, blocking connections
    on threads of the store's."""
    queue = make_queue(postgres_url(pg_schema))

    @queue.task(name="probe")
    async def probe() -> None:
        pass

    async with queue:
        await queue.wait(await queue.enqueue(probe), timeout=10)
        names = [t.name for t in threading.enumerate() if pg_schema in t.name]
        threads = sorted({name.split(":")[0] for name in names})
    if anyio_backend_name == "asyncio":
        assert threads == []
    else:
        assert threads == ["flexq-postgres", "flexq-postgres-listen"]


def test_store_code_that_awaits_anything_but_its_connection_is_refused_on_a_thread() -> None:
    """SQL code run on a thread's blocking connection must not suspend: doing so is a bug
    that raises, instead of leaving the transaction half run."""
    with pytest.raises(RuntimeError, match="awaited something other"):
        run_blocking(asyncio.sleep(0))


class _SideBySideStore(PostgresStore):
    """Counts the claims in flight at once, and can make each wait before or after its query."""

    def __init__(self, schema: str, **options: Any) -> None:
        super().__init__(POSTGRES_DSN, schema=schema, **options)
        self.in_flight = 0
        self.most_in_flight = 0
        self.claims = 0
        self.fail_next = False
        self.hold = anyio.Event()
        self.hold.set()
        self.two_in_flight = anyio.Event()

    async def claim(self, *args: Any) -> list[ClaimedJob]:
        self.claims += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight == 2:
            self.two_in_flight.set()
        try:
            await anyio.sleep(0.02)  # claims that may overlap do
            if self.fail_next:
                self.fail_next = False
                raise StoreError("the claim's connection broke")
            jobs = await super().claim(*args)
            await self.hold.wait()
            return jobs
        finally:
            self.in_flight -= 1


def test_claims_run_side_by_side_when_the_pool_has_a_connection_to_spare() -> None:
    assert PostgresStore(POSTGRES_DSN).parallel_claims == 2
    assert PostgresStore(POSTGRES_DSN, connections=3).parallel_claims == 2
    assert PostgresStore(POSTGRES_DSN, connections=2).parallel_claims == 1


async def test_two_claims_in_flight_never_claim_more_than_the_free_workers(
    pg_schema: str,
) -> None:
    """Many free workers are claimed for by two claims at once, which share them out: no more
    jobs are held than there are workers, and each job runs once."""
    store = _SideBySideStore(pg_schema)
    queue = make_queue(store, workers=200)
    runs: dict[int, int] = {}
    running = most_running = 0

    @queue.task(name="nap")
    async def nap(n: int) -> None:
        nonlocal running, most_running
        runs[n] = runs.get(n, 0) + 1
        running += 1
        most_running = max(most_running, running)
        await anyio.sleep(0.005)
        running -= 1

    await _fill(queue, [flexq.Call(nap, n).with_options(tenant=f"t{n % 2}") for n in range(1000)])
    with anyio.fail_after(60):
        async with queue:
            while len(runs) < 1000:
                await anyio.sleep(0.05)
                assert queue.statistics().running <= 200
    assert store.most_in_flight == 2
    assert most_running <= 200
    assert set(runs) == set(range(1000))
    assert set(runs.values()) == {1}


async def test_a_claim_that_fails_beside_another_loses_no_job(pg_schema: str) -> None:
    """A claim running in a task of its own that fails is tried again after a pause; the jobs
    it would have taken still run, once each."""
    store = _SideBySideStore(pg_schema)
    queue = make_queue(store, workers=200)
    runs: dict[int, int] = {}
    all_ran = anyio.Event()

    @queue.task(name="count")
    async def count(n: int) -> None:
        runs[n] = runs.get(n, 0) + 1
        if len(runs) == 500:
            all_ran.set()

    await _fill(queue, [flexq.Call(count, n) for n in range(500)])
    store.fail_next = True
    with anyio.fail_after(60):
        async with queue:
            await all_ran.wait()
    assert not store.fail_next
    assert set(runs.values()) == {1}


async def test_claims_in_flight_when_the_queue_closes_leave_no_job_held(pg_schema: str) -> None:
    """Closing the queue while two claims are under way waits for them: their jobs run or go
    back to the queue, and none stays claimed by a process that is gone."""
    store = _SideBySideStore(pg_schema)
    queue = make_queue(store, workers=200, grace_period=0.5)
    runs: dict[int, int] = {}

    @queue.task(name="count")
    async def count(n: int) -> None:
        runs[n] = runs.get(n, 0) + 1

    await _fill(queue, [flexq.Call(count, n) for n in range(500)])
    store.hold = anyio.Event()

    released_at = closed_at = 0.0

    async def let_the_claims_return() -> None:
        nonlocal released_at
        await anyio.sleep(0.2)
        released_at = anyio.current_time()
        store.hold.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            async with queue:
                await store.two_in_flight.wait()
                group.start_soon(let_the_claims_return)
            closed_at = anyio.current_time()
    assert closed_at >= released_at > 0
    counts = await _counts_after(pg_schema)
    assert counts.get(State.PROCESSING, 0) == 0
    assert counts.get(State.COMPLETED, 0) == len(runs)
    assert counts.get(State.COMPLETED, 0) + counts.get(State.QUEUED, 0) == 500
    assert set(runs.values()) <= {1}


async def _fill(queue: flexq.Queue, calls: list[flexq.Call]) -> None:
    """Enqueue ``calls`` while the queue is open without its workers."""
    await queue.open()
    try:
        await queue.enqueue_many(calls)
    finally:
        await queue.close()


async def _counts_after(schema: str) -> dict[State, int]:
    queue = make_queue(postgres_url(schema))
    await queue.open()
    try:
        return dict(await queue.counts())
    finally:
        await queue.close()
