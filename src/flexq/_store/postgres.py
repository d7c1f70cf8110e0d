"""The PostgreSQL store: many processes on many hosts share one database.

Its SQL code is written once, as coroutines that take a connection and await only it
(:mod:`flexq._store._pg_connections`): under asyncio they run on the event loop with psycopg's
async connections, under trio (where psycopg's async API does not work) on threads with its
blocking ones. Every store call is one complete transaction on one connection (most are a
single statement in autocommit mode, so one network round trip); the store keeps up to
``connections`` of them, so independent transactions (an enqueue, a claim, a report) run at
the same time. A caller that is cancelled waits for its transaction to end: a transaction is
never left half done.

Claims lock rows with ``FOR UPDATE SKIP LOCKED``: processes never wait for each other's claims
and never claim the same job. Each claim reads the best jobs of each (tenant, task) pair off a
partial index of the QUEUED rows, so it costs the same with a million waiting jobs as with a
thousand.

Wake-ups: an enqueue that makes work ready sends a NOTIFY in its own transaction (delivered
when it commits). :meth:`PostgresStore.listen` keeps a LISTEN connection (an async one under
asyncio, a blocking one on a thread of its own under trio) and wakes the dispatcher of this
process when *another* process's transaction notifies;
this process's own enqueues wake its dispatcher in-process, without a round trip. The
dispatcher's slow poll stays as a fallback for lost notifications (a dropped LISTEN connection
is reopened with backoff, and its reopening triggers a poll).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import psycopg
import psycopg.conninfo
import structlog
from psycopg.pq import TransactionStatus

from flexq._cancellation import on_asyncio, to_the_end
from flexq._errors import (
    DuplicateJob,
    FlexqError,
    InvalidArguments,
    JobNotFound,
    LimitExceeded,
    NotHolding,
    SchemaVersionError,
    StoreError,
)
from flexq._limits import LimitTable
from flexq._models import JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import dumps
from flexq._states import FINAL_STATES, RUNNING_STATES, Kind, State, check_transition
from flexq._store._pg_connections import (
    AsyncConnection,
    AsyncConnections,
    BlockingConnection,
    Conn,
    Connection,
    ThreadConnections,
    fetch_all,
    fetch_one,
    readable,
    run_blocking,
)
from flexq._store._pg_migrations import KEY_CONFLICT, MIGRATIONS, SCHEMA_VERSION, statements
from flexq._store._thread import _threadsafe
from flexq._store.base import (
    ACTIVE_BATCH_STATES,
    HOLDING_STEP,
    NO_BATCH_COUNTS,
    BatchCounts,
    ChunkDone,
    ClaimedJob,
    ClaimRequest,
    DependentJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    NewJob,
    Outcome,
    Placement,
    Recovered,
    Renewal,
    ScheduleFiring,
    ScheduleRecord,
    SchemaStatus,
    WaitFacts,
    WorkerRecord,
    checked_outcomes,
    holding_full,
    job_info,
    lease_error,
    parent_failed_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Coroutine, Generator, Mapping, Sequence

T = TypeVar("T")

log = structlog.get_logger("flexq")

MAX_SCHEMA_NAME = 57
"""PostgreSQL names have at most 63 bytes, and the schema's notification channel is
``flexq_<schema>``."""
_SCHEMA_NAME = re.compile(rf"[a-z_][a-z0-9_]{{0,{MAX_SCHEMA_NAME - 1}}}")
_FINAL = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
_RUNNING = ",".join(f"'{s}'" for s in sorted(RUNNING_STATES))
MAX_PAYLOAD = 7900
"""NOTIFY payloads must stay under 8000 bytes; a longer list of tenants becomes a poll."""

TCP_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
"""libpq settings for a server that falls silent (a network cut, a host gone): its connections
fail within about 30 s instead of waiting for the operating system's hours. The DSN's own
settings of these win."""

PARALLEL_CLAIMS = 2
"""Claims a queue may have in flight at once: one connection claims while the rows of the
other's claim are read and its jobs handed over, and the server runs both on two cores."""
ADMIT_CHUNK = 1000
"""Tenants admitted per transaction by an admission pass: each holds an advisory lock until its
transaction ends, and the server's lock table is finite."""

LISTEN_BACKOFF = (0.1, 5.0)
"""The LISTEN connection is reopened after a pause that starts at the first and doubles up to
the second while attempts fail (or connections fail again soon after they listen)."""

LISTEN_STEADY = 5.0
"""A LISTEN connection that listened this many seconds before it failed was a good one: the
pause before the next starts again from the first of :data:`LISTEN_BACKOFF`."""

LISTEN_PING = 30.0
"""After this many seconds without a notification, the LISTEN connection runs ``SELECT 1``: a
peer that vanished shows up then."""

READ_ATTEMPTS = 3
"""How often a read is tried when the server drops its connection (writes are tried once: their
callers decide what to do about a transaction that may or may not have committed)."""

_ACTIVE = ",".join(f"'{s}'" for s in sorted(ACTIVE_BATCH_STATES))
CHUNK_PENDING, CHUNK_SUCCEEDED, CHUNK_FAILED = 0, 1, 2
_INFO_COLUMNS = (
    "seq, id, task, kind, tenant, priority, state, args, kwargs, attempts, max_attempts, "
    "created_at, run_at, started_at, finished_at, result, errors, parent_id, key, progress, "
    "abort_requested, prepared, total_items, chunks_total, items_processed, chunks_succeeded, "
    "chunks_failed, callouts"
)
_INFO_FROM = "{s}.flexq_jobs LEFT JOIN {s}.flexq_batches ON flexq_batches.job_id = flexq_jobs.id"
"""A job's row and its batch counts (if it is a batch job)."""
ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true)"
"""Evaluated by a statement, lets its transaction commit without waiting for the disk.

Claims, lease renewals and promotions use it: if the server crashes before their WAL reaches
the disk (a fraction of a second later), they are undone, and undoing them is safe (the job is
QUEUED again, or SCHEDULED, or its lease a few seconds shorter). An outcome written later is
flushed with all the WAL before it, claim included. Enqueues and outcomes wait for the disk."""

_CLAIMED = (
    "j.id, j.task, j.kind, j.tenant, j.priority, j.args, j.kwargs, j.attempts, j.max_attempts,"
    " j.timeout, j.parent_id, j.kind_rank, j.seq"
)
_CLAIMED_COLUMNS = f"{_CLAIMED}, {ASYNC_COMMIT}"
_TAKE = (
    "state = CASE WHEN j.kind = 'batch' THEN 'PREPARING' ELSE 'PROCESSING' END,"
    " attempts = j.attempts + 1, started_at = %(now)s,"
    " lease_owner = %(owner)s, lease_until = %(lease_until)s"
)
_RUNNABLE = """
pauses AS MATERIALIZED (SELECT scope, name FROM {s}.flexq_pauses),
runnable AS (
    SELECT task FROM unnest(%(tasks)b::text[]) AS r(task)
    WHERE NOT EXISTS (SELECT 1 FROM pauses WHERE scope = 'queue')
        AND task NOT IN (SELECT name FROM pauses WHERE scope = 'task')
)"""

_INSERT = """
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, timeout, created_at, run_at, parent_id, key)
SELECT id, task, kind, kind_rank, tenant, priority, state, args, kwargs, max_attempts, timeout,
    %(now)s, run_at, parent_id, key
FROM unnest(%(id)b::text[], %(task)b::text[], %(kind)b::text[], %(kind_rank)b::int[],
    %(tenant)b::text[], %(priority)b::int[], %(state)b::text[], %(args)b::text[],
    %(kwargs)b::text[], %(max_attempts)b::int[], %(timeout)b::float8[], %(run_at)b::float8[],
    %(parent_id)b::text[], %(key)b::text[])
    AS v(id, task, kind, kind_rank, tenant, priority, state, args, kwargs, max_attempts, timeout,
         run_at, parent_id, key)"""

_INSERT_ONE = """
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, timeout, created_at, run_at, parent_id, key)
VALUES (%(id)s, %(task)s, %(kind)s, %(kind_rank)s, %(tenant)s, %(priority)s, %(state)s,
    %(args)s, %(kwargs)s, %(max_attempts)s, %(timeout)s, %(now)s, %(run_at)s, %(parent_id)s,
    %(key)s)"""
"""One job: cheaper for the server than unnesting arrays of one element (an idle queue's
enqueue is a round trip of its latency)."""

INSERT_CLAIMED = """
WITH f AS MATERIALIZED (
    SELECT NOT EXISTS (
        SELECT FROM {s}.flexq_pauses
        WHERE scope = 'queue' OR (scope = 'task' AND name = %(task)s)
            OR (scope = 'tenant' AND name = %(tenant)s)
    ) AND NOT EXISTS (
        SELECT FROM unnest(%(tasks)b::text[]) AS r(task) CROSS JOIN LATERAL (
            SELECT FROM {s}.flexq_jobs
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = %(tenant)s
                AND task = r.task
            ORDER BY priority DESC, kind_rank, seq
            LIMIT 1
        ) AS waiting
    ) AS free
)
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, timeout, created_at, run_at, parent_id, attempts, started_at, lease_owner,
    lease_until)
SELECT %(id)s, %(task)s, %(kind)s, %(kind_rank)s, %(tenant)s, %(priority)s,
    CASE WHEN free THEN 'PROCESSING' ELSE 'QUEUED' END, %(args)s, %(kwargs)s,
    %(max_attempts)s, %(timeout)s, %(now)s, %(run_at)s, %(parent_id)s,
    CASE WHEN free THEN 1 ELSE 0 END, CASE WHEN free THEN %(now)s::float8 END,
    CASE WHEN free THEN %(owner)s::text END, CASE WHEN free THEN %(lease_until)s::float8 END
FROM f
RETURNING id, task, kind, tenant, priority, args, kwargs, attempts, max_attempts, timeout,
    parent_id, kind_rank, seq, state = 'PROCESSING' AS claimed"""
"""One ready job, inserted already claimed when :data:`CLAIM` would take it: nothing of its
tenant waits QUEUED for the tasks asked for, and no pause holds it. Else it is inserted QUEUED.
The row it returns is a claimed row, and whether it was claimed. Like the claim, it looks for
waiting jobs in ``flexq_jobs_ready``, once per task and in the index's order: a mere EXISTS
would scan the table when the planner expects many rows to match.

An idle queue's enqueue is one statement, not an insert and a claim in a pipeline: its latency
is the round trip of a plain insert, and the server does less after a sleep."""

INSERT_CLAIMED_NOTIFYING = (
    "WITH inserted AS ("
    + INSERT_CLAIMED
    + ")\nSELECT *, CASE WHEN NOT claimed THEN pg_notify(%(channel)s, %(payload)s) END"
    + " FROM inserted"
)
""":data:`INSERT_CLAIMED` that wakes other processes if it leaves the job QUEUED."""

_CLAIM = (
    "WITH"
    + _RUNNABLE
    + """,
wanted AS (
    SELECT tenant, n FROM unnest(%(tenants)b::text[], %(counts)b::int[]) AS w(tenant, n)
    WHERE tenant NOT IN (SELECT name FROM pauses WHERE scope = 'tenant')
),
candidates AS (
    SELECT w.tenant, w.n, c.seq, c.priority, c.kind_rank
    FROM wanted AS w CROSS JOIN runnable AS r CROSS JOIN LATERAL (
        SELECT seq, priority, kind_rank FROM {s}.flexq_jobs
        WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = w.tenant AND task = r.task
        ORDER BY priority DESC, kind_rank, seq
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    ) AS c
),
chosen AS (
    SELECT seq FROM (
        SELECT seq, n, row_number() OVER (
            PARTITION BY tenant ORDER BY priority DESC, kind_rank, seq) AS rank
        FROM candidates
    ) AS ranked
    WHERE rank <= n
)
UPDATE {s}.flexq_jobs AS j SET """
    + _TAKE
    + """
WHERE j.seq = ANY (ARRAY(SELECT seq FROM chosen))
RETURNING """
)
CLAIM = _CLAIM + _CLAIMED_COLUMNS
"""Claims for every tenant at once: the best ``n`` of each (tenant, runnable task) pair, read
off ``flexq_jobs_ready`` and locked (skipping rows other claims hold), then the best ``n`` of
each tenant among those.

Here and below, updates find their rows with ``= ANY (array)``: joined to a CTE or a VALUES
list instead, the planner may guess many rows and hash the whole table."""

CLAIM_DURABLE = _CLAIM + _CLAIMED
""":data:`CLAIM` in the transaction of an enqueue, which must wait for the disk."""

READY_TENANTS = """
WITH RECURSIVE ready(tenant) AS (
    (SELECT tenant FROM {s}.flexq_jobs
     WHERE state = 'QUEUED' AND lease_expiries = 0
     ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM {s}.flexq_jobs
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant > ready.tenant
            ORDER BY tenant LIMIT 1)
    FROM ready WHERE ready.tenant IS NOT NULL
)
SELECT tenant FROM ready
WHERE tenant IS NOT NULL AND EXISTS (
    SELECT FROM unnest(%(tasks)b::text[]) AS r(task) CROSS JOIN LATERAL (
        SELECT FROM {s}.flexq_jobs
        WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = ready.tenant
            AND task = r.task
        ORDER BY priority DESC, kind_rank, seq
        LIMIT 1
    ) AS waiting
)
ORDER BY tenant"""
"""A loose index scan over ``flexq_jobs_ready``: one probe per tenant with QUEUED jobs, and one
per such tenant and task asked for. There is no second index over (task, tenant), as the
SQLite store has: without statistics (a new table) PostgreSQL's planner would claim through it
and sort a tenant's whole backlog. Each probe for a task is a lateral subquery with a limit,
in the index's order: with statistics older than a fast-growing backlog, the planner turned a
plain EXISTS into a hash join over every ready job of the tasks (96 ms, every poll, at 130,000
waiting jobs), and without the order it would rather scan the table for a first match."""

_SUSPECT = """
SELECT seq FROM {s}.flexq_jobs
WHERE state = 'QUEUED' AND lease_expiries > 0 AND task IN (SELECT task FROM runnable)
    AND tenant NOT IN (SELECT name FROM pauses WHERE scope = 'tenant')
ORDER BY seq
LIMIT 1"""

HAS_SUSPECTS = "WITH" + _RUNNABLE + "\nSELECT EXISTS (" + _SUSPECT + ")"

CLAIM_SUSPECT = (
    "WITH"
    + _RUNNABLE
    + ",\nsuspect AS ("
    + _SUSPECT
    + "\nFOR UPDATE SKIP LOCKED)\nUPDATE {s}.flexq_jobs AS j SET "
    + _TAKE
    + "\nWHERE j.seq = (SELECT seq FROM suspect)\nRETURNING "
    + _CLAIMED_COLUMNS
)

PROMOTE = (
    """
WITH due AS (
    SELECT seq FROM {s}.flexq_jobs
    WHERE state = 'SCHEDULED' AND run_at <= %(now)s
    ORDER BY run_at
    LIMIT 5000
    FOR UPDATE SKIP LOCKED
),
promoted AS (
    UPDATE {s}.flexq_jobs AS j SET state = 'QUEUED'
    WHERE j.seq = ANY (ARRAY(SELECT seq FROM due))
    RETURNING j.tenant
)
SELECT
    ARRAY(SELECT DISTINCT tenant FROM promoted ORDER BY tenant),
    (SELECT run_at FROM {s}.flexq_jobs
     WHERE state = 'SCHEDULED' AND seq NOT IN (SELECT seq FROM due)
     ORDER BY run_at LIMIT 1),
    """
    + ASYNC_COMMIT
)
"""Due jobs to QUEUED, and the earliest run_at of those still waiting (the statement sees the
table as it was before its own update, so the promoted rows are left out by hand)."""

_APPEND_ERROR = (
    "CASE WHEN v.error IS NULL THEN j.errors WHEN j.errors IS NULL THEN '[' || v.error || ']'"
    " ELSE left(j.errors, -1) || ',' || v.error || ']' END"
)

_BY_ID = """
held AS MATERIALIZED (
    SELECT found.seq, v.* FROM v CROSS JOIN LATERAL (
        SELECT seq FROM {s}.flexq_jobs WHERE id = v.id{guard}
    ) AS found
)"""

REPORT = f"""
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(id)b::text[], %(state)b::text[], %(result)b::text[],
        %(error)b::text[], %(run_at)b::float8[], %(release)b::bool[], %(retry)b::bool[],
        %(final)b::bool[], %(callouts)b::int[])
        AS v(id, state, result, error, run_at, release, retry, final, callouts)
),{_BY_ID.format(s="{s}", guard=" AND lease_owner = %(owner)s")}
UPDATE {{s}}.flexq_jobs AS j SET
    attempts = j.attempts - CASE WHEN v.release THEN 1 ELSE 0 END,
    state = CASE WHEN NOT v.release THEN v.state
                 WHEN j.abort_requested THEN 'ABORTED' ELSE 'QUEUED' END,
    run_at = CASE WHEN v.retry THEN v.run_at ELSE j.run_at END,
    result = CASE WHEN v.final THEN v.result ELSE j.result END,
    finished_at = CASE WHEN v.final OR (v.release AND j.abort_requested) THEN %(now)s END,
    errors = {_APPEND_ERROR},
    callouts = j.callouts + v.callouts,
    lease_owner = NULL,
    lease_until = NULL
FROM held AS v
WHERE j.seq = v.seq AND j.lease_owner = %(owner)s
RETURNING j.id, j.state, j.tenant, j.kind"""
"""Every outcome of a report in one statement: each row of ``v`` is one job's outcome.

The jobs are found one id at a time (``held``), each through the unique index of ids, and
the update then takes them by ``seq`` from a CTE the planner believes small, so it probes the
primary key once per job. Joined to the outcomes as it liked, the planner (with a generic
plan, which thinks every array has 10 elements) compared every outcome with every job, or
went through the index of running jobs, which is full of dead entries of the jobs run since
the last vacuum: a report of 5,000 outcomes took seconds. Only running jobs have a
``lease_owner`` (every move out of a running state clears it), so the owner alone guards the
update, and is checked again on the locked row."""

REPORT_DONE = """
UPDATE {s}.flexq_jobs AS j SET state = 'COMPLETED', finished_at = %(now)s, result = NULL,
    lease_owner = NULL, lease_until = NULL
WHERE j.id = ANY(%(id)b::text[]) AND j.lease_owner = %(owner)s
    AND NOT j.has_dependants AND j.kind <> 'batch'
RETURNING j.id"""
""":data:`REPORT` of jobs that completed without a value or a callout (what most reports are),
in a statement of its own: the same writes, with only the ids to bind and nothing to join
them to. It leaves out the jobs whose end has more to settle (batch jobs, and parents of
other jobs: see :data:`LOCK_PARENTS`), which the general report then writes."""

LOCK_PARENTS = """
SELECT id, state FROM {s}.flexq_jobs WHERE id = ANY(%b::text[]) ORDER BY id FOR NO KEY UPDATE"""
"""Locks the parents of new dependants (in id order), returning their states.

A parent cannot end before this transaction commits (with the edges it adds), nor this
transaction miss that it ended. The edges mark their parents (``has_dependants``, set by a
trigger on ``flexq_dependencies``, whoever inserts them) on the parents' rows: a report that
waited for this lock rechecks the row as it is then, so :data:`REPORT_DONE` leaves a marked
parent to the general report, which releases its dependants in its own transaction. (A
shared lock here would let two transactions that add dependants to one parent deadlock when
their edges mark it.)"""

RENEW = f"""
WITH held AS (
    SELECT seq FROM {{s}}.flexq_jobs
    WHERE id = ANY(%(ids)b::text[]) AND state IN ({_RUNNING}) AND lease_owner = %(owner)s
    FOR UPDATE SKIP LOCKED
), renewed AS (
    UPDATE {{s}}.flexq_jobs AS j SET lease_until = %(lease_until)s
    WHERE j.seq = ANY (ARRAY(SELECT seq FROM held))
    RETURNING j.id, j.abort_requested
)
SELECT
    ARRAY(SELECT id FROM renewed WHERE abort_requested),
    ARRAY(
        SELECT n.id FROM unnest(%(ids)b::text[]) AS n(id)
        WHERE NOT EXISTS (
            SELECT FROM {{s}}.flexq_jobs AS j
            WHERE j.id = n.id AND j.state IN ({_RUNNING}) AND j.lease_owner = %(owner)s
        )
    ),
    {ASYNC_COMMIT}"""
"""The jobs named, found by their ids, and of them those whose abort was requested and those
the owner lost. A job that this owner holds in the table but not in its runner (a claim whose
answer was lost with its connection) is not renewed, and is recovered when its lease expires.
Rows locked by another transaction (a report in flight, an abort request, a dependant's enqueue)
are skipped: locking them in another order than a report could deadlock. Whether a job was
lost is read from its committed row without a lock, so a skipped row is not lost while the
owner still holds it."""

EXPIRED = f"""
SELECT id, attempts, lease_expiries, abort_requested, kind, tenant FROM {{s}}.flexq_jobs
WHERE state IN ({_RUNNING}) AND lease_until < %(now)s
ORDER BY lease_until
FOR UPDATE SKIP LOCKED"""

RECOVER = f"""
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(id)b::text[], %(state)b::text[], %(error)b::text[],
        %(finished_at)b::float8[]) AS v(id, state, error, finished_at)
),{_BY_ID.format(s="{s}", guard="")}
UPDATE {{s}}.flexq_jobs AS j SET
    state = v.state,
    errors = {_APPEND_ERROR},
    lease_owner = NULL,
    lease_until = NULL,
    lease_expiries = j.lease_expiries + 1,
    finished_at = v.finished_at
FROM held AS v
WHERE j.seq = v.seq"""

PRUNE = f"""
WITH gone AS (
    DELETE FROM {{s}}.flexq_jobs WHERE seq IN (
        SELECT seq FROM {{s}}.flexq_jobs
        WHERE finished_at < %(before)s AND state IN ({_FINAL})
        ORDER BY finished_at, seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, kind
),
batches AS (SELECT id FROM gone WHERE kind = 'batch'),
chunks AS (DELETE FROM {{s}}.flexq_chunks WHERE job_id IN (SELECT id FROM batches)),
counts AS (DELETE FROM {{s}}.flexq_batches WHERE job_id IN (SELECT id FROM batches))
SELECT count(*) FROM gone"""
"""Final jobs, with the chunks and counts of the batch jobs among them."""


LOCK_TENANTS = (
    "SELECT pg_advisory_xact_lock(hashtextextended(%(prefix)s || tenant, 0))"
    " FROM unnest(%(tenants)b::text[]) AS t(tenant)"
)
"""Lock the slot accounting and holding queues of tenants (given sorted, so that two
transactions lock them in one order), until the transaction ends. Every transaction that puts
a job into a holding queue, moves one in it or out of it, or ends a batch job in an active slot
holds its tenant's lock when it counts and admits: two processes never both admit into the last
free slot."""

_ONE_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
"""First in a transaction of several reads: they all see the same committed state."""

_ADD_BATCHES = "INSERT INTO {s}.flexq_batches (job_id) SELECT unnest(%b::text[])"
"""The (empty) chunk counts of new batch jobs."""

USAGE = f"""
SELECT
    (SELECT count(*) FROM {{s}}.flexq_jobs WHERE tenant = %(tenant)s AND state = 'HOLDING'),
    (SELECT count(*) FROM {{s}}.flexq_jobs
     WHERE tenant = %(tenant)s AND kind = 'batch' AND state IN ({_ACTIVE}))"""

HOLD = """
UPDATE {s}.flexq_jobs AS j SET state = 'HOLDING', position = (
    SELECT coalesce(max(position), 0) FROM {s}.flexq_jobs
    WHERE tenant = %(tenant)s AND state = 'HOLDING'
) + %(step)s * array_position(%(ids)b::text[], j.id)
WHERE j.id = ANY(%(ids)b::text[])"""
"""Put jobs (new ones, HOLDING without a place yet, or released WAITING ones) at the end of
their tenant's holding queue, in the order of ``ids``."""

ADMIT = f"""
WITH wanted AS (
    SELECT tenant, slots FROM unnest(%(tenants)b::text[], %(slots)b::int[]) AS w(tenant, slots)
),
chosen AS (
    SELECT h.seq FROM wanted AS w CROSS JOIN LATERAL (
        SELECT seq FROM {{s}}.flexq_jobs
        WHERE tenant = w.tenant AND state = 'HOLDING'
        ORDER BY position
        LIMIT greatest(0, w.slots - (
            SELECT count(*) FROM {{s}}.flexq_jobs
            WHERE tenant = w.tenant AND kind = 'batch' AND state IN ({_ACTIVE})))
    ) AS h
)
UPDATE {{s}}.flexq_jobs AS j SET state = 'QUEUED', position = NULL
WHERE j.seq = ANY (ARRAY(SELECT seq FROM chosen)) AND j.state = 'HOLDING'
RETURNING j.tenant"""
"""Move each tenant's first HOLDING jobs into its free active slots (``slots`` of them in
all); the tenants must be locked."""

HOLDING_TENANTS = f"""
WITH RECURSIVE holding(tenant) AS (
    (SELECT tenant FROM {{s}}.flexq_jobs WHERE state = 'HOLDING' ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM {{s}}.flexq_jobs
            WHERE state = 'HOLDING' AND tenant > holding.tenant ORDER BY tenant LIMIT 1)
    FROM holding WHERE holding.tenant IS NOT NULL
)
SELECT tenant, (SELECT count(*) FROM {{s}}.flexq_jobs AS j
                WHERE j.tenant = holding.tenant AND kind = 'batch' AND state IN ({_ACTIVE}))
FROM holding WHERE tenant IS NOT NULL"""
"""Tenants with HOLDING jobs (a loose scan of ``flexq_jobs_holding``) and their active batch
jobs."""

QUEUED_TENANTS = """
WITH RECURSIVE ready(tenant) AS (
    (SELECT tenant FROM {s}.flexq_jobs
     WHERE state = 'QUEUED' AND lease_expiries = 0
     ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM {s}.flexq_jobs
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant > ready.tenant
            ORDER BY tenant LIMIT 1)
    FROM ready WHERE ready.tenant IS NOT NULL
)
SELECT count(*) FROM ready WHERE tenant IS NOT NULL AND tenant <> %(tenant)s"""

_HELD = f"id = %(id)s AND lease_owner = %(owner)s AND state IN ({_RUNNING})"
"""A job that ``owner`` holds a lease on."""

ADD_CHUNKS = f"""
WITH held AS (SELECT 1 FROM {{s}}.flexq_jobs WHERE {_HELD} FOR SHARE),
added AS (
    INSERT INTO {{s}}.flexq_chunks (job_id, idx, size, items)
    SELECT %(id)s, %(first)s + n - 1, size, items
    FROM unnest(%(sizes)b::int[], %(items)b::text[]) WITH ORDINALITY AS c(size, items, n)
    WHERE EXISTS (SELECT FROM held)
)
SELECT EXISTS (SELECT FROM held)"""

END_PREPARING = f"""
WITH held AS (SELECT seq FROM {{s}}.flexq_jobs WHERE {_HELD} FOR UPDATE),
counts AS (
    UPDATE {{s}}.flexq_batches SET prepared = true, total_items = %(total_items)s,
        chunks_total = %(chunks_total)s
    WHERE job_id = %(id)s AND EXISTS (SELECT FROM held)
)
UPDATE {{s}}.flexq_jobs SET state = 'PROCESSING' WHERE seq = (SELECT seq FROM held)
RETURNING id"""

CHECKPOINT = f"""
WITH held AS (SELECT 1 FROM {{s}}.flexq_jobs WHERE {_HELD} FOR SHARE),
v AS (
    SELECT * FROM unnest(%(chunk)b::int[], %(items)b::bigint[], %(error)b::text[])
        AS v(chunk, items, error)
),
done AS (
    UPDATE {{s}}.flexq_chunks AS c
    SET status = CASE WHEN v.error IS NULL THEN {CHUNK_SUCCEEDED} ELSE {CHUNK_FAILED} END,
        error = v.error
    FROM v
    WHERE c.job_id = %(id)s AND c.idx = v.chunk AND c.status = {CHUNK_PENDING}
        AND EXISTS (SELECT FROM held)
    RETURNING v.items, v.error
),
counts AS (
    UPDATE {{s}}.flexq_batches SET
        items_processed = items_processed + (SELECT coalesce(sum(items), 0) FROM done),
        chunks_succeeded = chunks_succeeded + (SELECT count(*) FROM done WHERE error IS NULL),
        chunks_failed = chunks_failed + (SELECT count(*) FROM done WHERE error IS NOT NULL)
    WHERE job_id = %(id)s AND EXISTS (SELECT FROM held)
)
SELECT EXISTS (SELECT FROM held)"""
"""Finished chunks (each counted once, however often it is reported) and the job's counts."""

_COUNTS = "prepared, total_items, chunks_total, items_processed, chunks_succeeded, chunks_failed"

_SCHEDULE_COLUMNS = (
    "name, tenant, cron, timezone, task, args, kwargs, misfire, reserve, state, next_fire_time,"
    " previous_fire_time, times_triggered, last_job_id, revision, created_at"
)

PUT_SCHEDULE = f"""
INSERT INTO {{s}}.flexq_schedules AS o ({_SCHEDULE_COLUMNS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, 0, NULL, 1, %s)
ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant, task = excluded.task,
    args = excluded.args, kwargs = excluded.kwargs, misfire = excluded.misfire,
    reserve = excluded.reserve,
    next_fire_time = CASE WHEN o.cron = excluded.cron AND o.timezone = excluded.timezone
                          THEN o.next_fire_time ELSE excluded.next_fire_time END,
    cron = excluded.cron, timezone = excluded.timezone, revision = o.revision + 1
RETURNING {_SCHEDULE_COLUMNS}"""

FIRE_SCHEDULE = """
UPDATE {s}.flexq_schedules SET next_fire_time = %s,
    previous_fire_time = COALESCE(%s, previous_fire_time),
    times_triggered = times_triggered + %s,
    last_job_id = COALESCE(%s, last_job_id), revision = revision + 1
WHERE name = %s AND revision = %s AND state = 'active'"""
"""Advance a schedule that no other process fired or changed since it was read: of two
processes that fire it at once, the second waits for the first's row lock, then finds the
revision moved on and updates nothing."""

DUE_SCHEDULES = f"""
SELECT {_SCHEDULE_COLUMNS} FROM {{s}}.flexq_schedules
WHERE state = 'active' AND next_fire_time <= %(now)s AND task = ANY(%(tasks)b::text[])
ORDER BY next_fire_time, name"""

NEXT_SCHEDULE = """
SELECT min(next_fire_time) FROM {s}.flexq_schedules
WHERE state = 'active' AND next_fire_time > %(now)s"""

RELEASE_EDGES = f"""
DELETE FROM {{s}}.flexq_dependencies AS d USING {{s}}.flexq_jobs AS j
WHERE d.parent_id = ANY(%(ids)b::text[]) AND j.id = d.parent_id AND j.state IN ({_FINAL})
RETURNING d.parent_id, d.child_id, d.on_parent_failure, j.state"""
"""The dependencies on those of the jobs that are final, with the state each parent ended in."""

ABORT_WAITING = f"""
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(id)b::text[], %(error)b::text[]) AS v(id, error)
),{_BY_ID.format(s="{s}", guard="")}
UPDATE {{s}}.flexq_jobs AS j SET state = 'ABORTED', finished_at = %(now)s,
    errors = {_APPEND_ERROR}
FROM held AS v
WHERE j.seq = v.seq AND j.state = 'WAITING'
RETURNING j.id"""

RELEASE_WAITING = """
UPDATE {s}.flexq_jobs AS j SET state = CASE WHEN j.kind = 'batch' THEN 'WAITING'
    WHEN j.run_at <= %(now)s THEN 'QUEUED' ELSE 'SCHEDULED' END
WHERE j.id = ANY(%(ids)b::text[]) AND j.state = 'WAITING'
    AND NOT EXISTS (SELECT 1 FROM {s}.flexq_dependencies AS d WHERE d.child_id = j.id)
RETURNING j.id, j.tenant, j.kind, j.state"""
"""Dependants whose last parent ended; batch jobs stay WAITING until they join their holding
queue (:meth:`PostgresStore._hold`)."""

CLAIM_JOBS = (
    "WITH"
    + _RUNNABLE
    + "\nUPDATE {s}.flexq_jobs AS j SET "
    + _TAKE
    + """
WHERE j.id = ANY(%(ids)b::text[]) AND j.state = 'QUEUED' AND j.lease_expiries = 0
    AND j.task IN (SELECT task FROM runnable)
    AND j.tenant NOT IN (SELECT name FROM pauses WHERE scope = 'tenant')
RETURNING """
    + _CLAIMED_COLUMNS
)

CHAIN = f"""
WITH RECURSIVE
    up(id, parent_id) AS (
        SELECT id, parent_id FROM {{s}}.flexq_jobs WHERE id = %(id)s
        UNION
        SELECT j.id, j.parent_id FROM {{s}}.flexq_jobs AS j JOIN up ON j.id = up.parent_id
    ),
    down(id) AS (
        SELECT %(id)s::text
        UNION
        SELECT j.id FROM {{s}}.flexq_jobs AS j JOIN down ON j.parent_id = down.id
    )
SELECT {_INFO_COLUMNS} FROM {_INFO_FROM}
WHERE id IN (SELECT id FROM up UNION SELECT id FROM down)
ORDER BY seq"""


def check_schema(schema: str) -> str:
    """The schema name, if it is a plain lower-case identifier (else InvalidArguments)."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise InvalidArguments(
            f"schema must be a lower-case identifier of at most {MAX_SCHEMA_NAME} characters"
            f" ([a-z_][a-z0-9_]*), not {schema!r}"
        )
    return schema


class PostgresStore:
    """Jobs in a PostgreSQL database, in tables of their own schema.

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        schema: the schema that holds flexq's tables (created if missing).
        connections: how many connections run transactions at once (under trio, each on a
            thread of its own); one more connection listens for notifications while workers
            run.
        connect_timeout: seconds to wait for a connection.
        migrate: create or migrate the schema when the store opens (under an advisory lock);
            if False, open only checks that the schema is at this flexq's version.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "flexq",
        connections: int = 4,
        connect_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        if not isinstance(connections, int) or isinstance(connections, bool) or connections < 1:
            raise InvalidArguments(f"connections must be an int >= 1, not {connections!r}")
        self.dsn = dsn
        self.schema = check_schema(schema)
        self.channel = f"flexq_{schema}"
        self.connect_timeout = connect_timeout
        self.migrates_on_open = migrate
        self._sql: dict[str, str] = {}
        self._free_workers: Callable[[], int] | None = None
        self._connections = connections
        self._pool: ThreadConnections | AsyncConnections | None = None
        self._limits = LimitTable()
        self._lock_prefix = f"flexq.tenant.{schema}."

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _connect_args(self) -> tuple[str, dict[str, Any]]:
        given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        defaults = {name: value for name, value in TCP_DEFAULTS.items() if name not in given}
        return psycopg.conninfo.make_conninfo(self.dsn, **defaults), {
            "autocommit": True,
            "connect_timeout": max(1, round(self.connect_timeout)),
            "application_name": "flexq",
            # Every statement is prepared at once and planned once: they all bind arrays and
            # values whose plans do not depend on them (the partial indexes say how to run them).
            "prepare_threshold": 0,
            "options": "-c plan_cache_mode=force_generic_plan",
        }

    def _connect(self) -> Connection:
        conninfo, options = self._connect_args()
        return psycopg.connect(conninfo, **options)

    async def _connect_async(self) -> AsyncConnection:
        conninfo, options = self._connect_args()
        return await psycopg.AsyncConnection.connect(conninfo, **options)

    def sql(self, template: str) -> str:
        """A statement of this module with this store's schema filled in."""
        text = self._sql.get(template)
        if text is None:
            text = self._sql[template] = template.replace("{s}", f'"{self.schema}"')
        return text

    @property
    def backend_pids(self) -> set[int]:
        """The server processes of the store's connections (none while it is closed)."""
        return self._pool.backend_pids if self._pool is not None else set()

    @property
    def parallel_claims(self) -> int:
        """Claims may run side by side, two at once, if the pool keeps a connection for the
        rest (reports, enqueues) besides them."""
        return PARALLEL_CLAIMS if self._connections > PARALLEL_CLAIMS else 1

    async def _run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """``await fn(connection, *args)`` on a connection of the store's."""
        if self._pool is None:
            raise FlexqError("the PostgreSQL store is not open")
        try:
            return await self._pool.run(fn, *args)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store (schema {self.schema!r}): {exc}") from exc

    async def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        """Rows of a statement that changes nothing: safe to run again on a fresh connection
        when the server dropped the one it ran on."""
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return await self._run(self._select, sql, params)
            except StoreError as exc:
                if not isinstance(exc.__cause__, psycopg.OperationalError):
                    raise
        return await self._run(self._select, sql, params)

    async def _notify(
        self, conn: Conn, tenants: Collection[str] | None, run_at: float | None
    ) -> None:
        await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, _payload(tenants, run_at)))

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        if on_asyncio():
            pool: ThreadConnections | AsyncConnections = AsyncConnections(
                self._connections, self._connect_async
            )
        else:
            name = f"flexq-postgres:{self.schema}"
            pool = ThreadConnections(name, self._connections, self._connect)
        self._pool = pool
        pool.start()
        try:
            await self._run(self._migrate if self.migrates_on_open else self._check)
        except BaseException:
            self._pool = None
            with anyio.CancelScope(shield=True):
                await pool.stop()
            raise

    async def schema_status(self) -> SchemaStatus:
        return await self._alone(self._status)

    async def migrate(self) -> SchemaStatus:
        return await self._alone(self._migrate)

    async def _alone(self, fn: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        """``await fn(connection)`` on a connection of its own, whether the store is open or
        not."""

        def blocking() -> T:
            with self._connect() as conn:
                return run_blocking(fn(BlockingConnection(conn)))

        try:
            if not on_asyncio():
                return await anyio.to_thread.run_sync(blocking)
            return await to_the_end(self._alone_async(fn))
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store (schema {self.schema!r}): {exc}") from exc

    async def _alone_async(self, fn: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        async with await self._connect_async() as conn:
            return await fn(conn)

    async def _status(self, conn: Conn) -> SchemaStatus:
        schema = f'"{self.schema}"'
        row = await fetch_one(conn, "SELECT to_regclass(%s)", (f"{schema}.flexq_migrations",))
        version = 0
        if row is not None and row[0] is not None:
            found = await fetch_one(
                conn, f"SELECT coalesce(max(version), 0) FROM {schema}.flexq_migrations"
            )
            version = found[0] if found else 0
        return SchemaStatus(f"schema {self.schema!r}", version, SCHEMA_VERSION)

    async def _check(self, conn: Conn) -> None:
        status = await self._status(conn)
        if status.version != SCHEMA_VERSION:
            raise SchemaVersionError(status.where, status.version, SCHEMA_VERSION)

    async def _migrate(self, conn: Conn, target: int = SCHEMA_VERSION) -> SchemaStatus:
        """Apply the migrations the schema lacks, up to ``target`` (tests make older schemas),
        in one transaction under an advisory lock: processes that start together take turns,
        and the later ones find the work done."""
        schema = f'"{self.schema}"'
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (f"flexq.migrate.{self.schema}",))  # fmt: skip
            status = await self._status(conn)
            if status.version > SCHEMA_VERSION:
                raise SchemaVersionError(status.where, status.version, SCHEMA_VERSION)
            if status.version == 0:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {schema}.flexq_migrations (version integer"
                    " PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL"
                    " DEFAULT now())"
                )
            applied: list[tuple[int, str]] = []
            for migration in MIGRATIONS:
                if not status.version < migration.version <= target:
                    continue
                for statement in statements(migration, schema):
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {schema}.flexq_migrations (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
                applied.append((migration.version, migration.description))
        return dataclasses.replace(status, applied=tuple(applied))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.stop()

    async def listen(
        self,
        wake: Callable[[list[str] | None, float | None], None],
        free_workers: Callable[[], int],
    ) -> None:
        """Until cancelled, call ``wake(tenants, run_at)`` when another process made work ready.

        ``tenants`` is None when the notification could not say whose work it is (too many
        tenants, jobs returned after a crash, a resumed pause, or a reconnection after which
        notifications may have been missed): the caller should then look at the store.

        Meanwhile this store's enqueues and retries notify other processes only when they
        make more jobs ready than ``free_workers()``: a process that takes on its own work
        wakes nobody else (who would only race it for the same jobs).
        """
        self._free_workers = free_workers
        try:
            if on_asyncio():
                await self._listen_on_the_loop(wake)
            else:
                await self._listen_on_a_thread(wake)
        finally:
            self._free_workers = None

    async def _listen_on_the_loop(
        self, wake: Callable[[list[str] | None, float | None], None]
    ) -> None:
        """:meth:`listen` under asyncio: an async LISTEN connection, reopened with backoff."""
        delay, first = 0.0, True
        while True:
            await anyio.sleep(delay)
            listening_since = None
            try:
                async with await self._connect_async() as conn:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    listening_since = time.monotonic()
                    if not first:
                        wake(None, None)  # notifications may have been missed meanwhile
                    while True:
                        heard = False
                        async for note in conn.notifies(timeout=LISTEN_PING):
                            heard = True
                            if note.pid not in self.backend_pids:
                                wake(*_parse_payload(note.payload))
                        if not heard:
                            await conn.execute("SELECT 1")  # a dead peer shows up here
            except psycopg.Error as exc:
                delay = _listen_retry(delay, exc, listening_since)
            first = False

    async def _listen_on_a_thread(
        self, wake: Callable[[list[str] | None, float | None], None]
    ) -> None:
        """:meth:`listen` under trio: a blocking LISTEN connection on a thread of its own."""
        listener = _Listener(self, wake)
        thread = threading.Thread(
            target=listener.serve, name=f"flexq-postgres-listen:{self.schema}", daemon=True
        )
        thread.start()
        try:
            await anyio.sleep_forever()
        finally:
            listener.stop()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
            listener.close()

    # -- enqueue ----------------------------------------------------------------------------

    def _tell_others(self, ready: int) -> bool:
        """Whether to NOTIFY other processes of ``ready`` new jobs (see :meth:`listen`)."""
        free_workers = self._free_workers
        return free_workers is None or ready > free_workers()

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        ready = sum(job.run_at <= now for unit in units for job in unit.jobs)
        return await self._run(self._enqueue, units, now, self._tell_others(ready))

    async def _enqueue(
        self, conn: Conn, units: Sequence[EnqueueUnit], now: float, tell_others: bool
    ) -> list[EnqueueResult]:
        jobs = [job for unit in units for job in unit.jobs]
        tenants = {job.tenant for job in jobs if job.run_at <= now}
        later = min((job.run_at for job in jobs if job.run_at > now), default=None)
        notify = tell_others and (tenants or later is not None)
        if all(_plain(job) for job in jobs):
            if len(jobs) == 1:
                sql, params = self.sql(_INSERT_ONE), _insert_one_params(jobs[0], now)
            else:
                sql, params = self.sql(_INSERT), _insert_params(jobs, now)
            if notify:
                sql = f"WITH inserted AS ({sql}) SELECT pg_notify(%(channel)s, %(payload)s)"
                params.update(channel=self.channel, payload=_payload(tenants, later))
            await conn.execute(sql, params)
            return [[job.id for job in unit.jobs] for unit in units]
        results: list[EnqueueResult] = []
        async with conn.transaction():
            await self._lock_tenants(conn, {job.tenant for job in jobs if job.kind is Kind.BATCH})
            unkeyed: list[NewJob] = []
            for unit in units:
                if all(_plain(job) for job in unit.jobs):
                    unkeyed.extend(unit.jobs)
                    results.append([job.id for job in unit.jobs])
                    continue
                await self._insert(conn, unkeyed, now)  # keep creation order: earlier units first
                unkeyed = []
                try:
                    async with conn.transaction():
                        results.append(await _run_steps(conn, self._insert_keyed(unit, now)))
                except (DuplicateJob, LimitExceeded) as refused:
                    results.append(refused)
            await self._insert(conn, unkeyed, now)
            if notify:
                await self._notify(conn, tenants, later)
        return results

    async def _insert(self, conn: Conn, jobs: list[NewJob], now: float) -> None:
        if jobs:
            await conn.execute(self.sql(_INSERT), _insert_params(jobs, now))

    def _insert_keyed(
        self, unit: EnqueueUnit, now: float
    ) -> Generator[tuple[str, Any], tuple[Any, ...] | None, list[JobId]]:
        """The statements that insert a unit with keys or batch jobs, job by job (run by
        :func:`_run_steps`); raises to refuse the unit.

        The tenants of its batch jobs must be locked (:data:`LOCK_TENANTS`)."""
        ids: list[JobId] = []
        held: dict[str, list[JobId]] = {}
        for job in unit.jobs:
            if job.key is None:
                yield self.sql(_INSERT_ONE), _insert_one_params(job, now)
                job_id = job.id
            else:
                sql, params = self._insert_or_find(job, now)
                # None: the job that held the key ended between the insert and the lookup. Again.
                while (row := (yield sql, params)) is None:
                    pass
                job_id = _inserted_or_duplicate(job, unit, row)
            if job.kind is Kind.BATCH and job_id == job.id:
                held.setdefault(job.tenant, []).append(job_id)
            ids.append(job_id)
        if held:
            batches = [job_id for group in held.values() for job_id in group]
            yield self.sql(_ADD_BATCHES), (batches,)
            yield from self._hold_new(held)
        return ids

    def _insert_or_find(self, job: NewJob, now: float) -> tuple[str, dict[str, Any]]:
        """A statement that inserts the job, or finds the unfinished job holding its key.

        It returns (id, inserted) or, rarely, nothing: when another transaction holds the key
        and ends the job before this statement looks it up (its snapshot predates the end).
        """
        sql = self.sql(
            f"WITH inserted AS ({_INSERT} ON CONFLICT {KEY_CONFLICT} DO NOTHING RETURNING id)"
            " SELECT id, true FROM inserted UNION ALL"
            " SELECT id, false FROM {s}.flexq_jobs WHERE tenant = %(one_tenant)s"
            f" AND key = %(one_key)s AND state NOT IN ({_FINAL})"
            " AND NOT EXISTS (SELECT FROM inserted)"
        )
        params = _insert_params([job], now)
        params.update(one_tenant=job.tenant, one_key=job.key)
        return sql, params

    # -- transactional enqueue --------------------------------------------------------------

    async def enqueue_in(self, connection: object, unit: EnqueueUnit, now: float) -> EnqueueResult:
        """Insert the unit's jobs in the current transaction of the application's ``connection``.

        A :class:`psycopg.AsyncConnection` is used on this event loop (asyncio); a
        :class:`psycopg.Connection` on a worker thread (asyncio or trio). The jobs, and the
        NOTIFY that wakes the workers, take effect when the caller commits; a DuplicateJob
        leaves the caller's transaction usable (its savepoint is rolled back).
        """
        try:
            if isinstance(connection, psycopg.AsyncConnection):
                return await self._enqueue_in(connection, unit, now)
            if isinstance(connection, psycopg.Connection):
                blocking = BlockingConnection(connection)
                return await anyio.to_thread.run_sync(
                    lambda: run_blocking(self._enqueue_in(blocking, unit, now))
                )
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store (schema {self.schema!r}): {exc}") from exc
        raise InvalidArguments(
            f"connection must be a psycopg Connection or AsyncConnection, not {connection!r}"
        )

    async def _enqueue_in(
        self, conn: AsyncConnection | BlockingConnection, unit: EnqueueUnit, now: float
    ) -> EnqueueResult:
        raw = conn.connection if isinstance(conn, BlockingConnection) else conn
        if not raw.autocommit and raw.info.transaction_status == TransactionStatus.IDLE:
            await conn.execute(_BEGIN_IMPLICITLY)
        (result,) = await self._enqueue(conn, [unit], now, True)
        return result

    # -- dispatching ------------------------------------------------------------------------

    async def ready_tenants(self, tasks: Collection[str]) -> list[str]:
        rows = await self._read(self.sql(READY_TENANTS), {"tasks": sorted(tasks)})
        return [tenant for (tenant,) in rows]

    async def claim(
        self,
        owner: str,
        wanted: Mapping[str, int],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        params = _claim_params(ClaimRequest(owner, wanted, tasks, lease_until), now)
        if params is None:
            return []
        rows = await self._run(self._select, self.sql(CLAIM), params)
        return sorted(map(_claimed, rows), key=_by_order)

    async def enqueue_and_claim(
        self, units: Sequence[EnqueueUnit], now: float, claim: ClaimRequest
    ) -> tuple[list[EnqueueResult], list[ClaimedJob] | None]:
        ready = sum(job.run_at <= now for unit in units for job in unit.jobs)
        results, rows = await self._run(
            self._enqueue_and_claim, units, now, self._tell_others(ready), claim
        )
        return results, None if rows is None else sorted(map(_claimed, rows), key=_by_order)

    async def _enqueue_and_claim(
        self,
        conn: Conn,
        units: Sequence[EnqueueUnit],
        now: float,
        tell_others: bool,
        claim: ClaimRequest,
    ) -> tuple[list[EnqueueResult], list[tuple[Any, ...]] | None]:
        params = _claim_params(claim, now)
        if params is None:
            return await self._enqueue(conn, units, now, tell_others), []
        alone = _claimable_alone(units, claim, now)
        if alone is not None:
            params.update(_insert_one_params(alone, now))
            sql = INSERT_CLAIMED
            if tell_others:
                sql = INSERT_CLAIMED_NOTIFYING
                params.update(channel=self.channel, payload=_payload({alone.tenant}, None))
            row = await fetch_one(conn, self.sql(sql), params)
            assert row is not None
            # Not claimed: others of its tenant wait, or a pause holds it; the dispatcher claims.
            return [[alone.id]], [row] if row[13] else None
        if not all(_plain(job) for unit in units for job in unit.jobs):
            results = await self._enqueue(conn, units, now, tell_others)
            return results, await self._select(conn, self.sql(CLAIM), params)
        # One round trip: the statements of a pipeline up to its sync are one transaction.
        async with conn.pipeline():
            results = await self._enqueue(conn, units, now, tell_others)
            claimed = await conn.execute(self.sql(CLAIM_DURABLE), params)
        return results, await claimed.fetchall()

    async def has_suspects(self, tasks: Collection[str]) -> bool:
        rows = await self._read(self.sql(HAS_SUSPECTS), {"tasks": sorted(tasks)})
        return bool(rows[0][0])

    async def claim_suspect(
        self, owner: str, tasks: Collection[str], now: float, lease_until: float
    ) -> ClaimedJob | None:
        params = {"tasks": sorted(tasks), "now": now, "owner": owner, "lease_until": lease_until}
        rows = await self._run(self._select, self.sql(CLAIM_SUSPECT), params)
        return _claimed(rows[0]) if rows else None

    async def report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[JobId]:
        checked = checked_outcomes(outcomes)
        # Released jobs are let go because this process stops: others must hear of them.
        retries = sum(o.state is State.QUEUED and not o.release for o in checked)
        released = any(o.release for o in checked)
        tell_others = released or self._tell_others(retries)
        return await self._run(self._report, owner, checked, now, tell_others)

    async def _report(
        self,
        conn: Conn,
        owner: str,
        outcomes: Sequence[Outcome],
        now: float,
        tell_others: bool,
    ) -> list[JobId]:
        if not outcomes:
            return []
        if not all(map(_done, outcomes)):
            return await self._report_settling(conn, owner, outcomes, now, tell_others)
        params = {"id": [o.job_id for o in outcomes], "owner": owner, "now": now}
        written = [job_id for (job_id,) in await fetch_all(conn, self.sql(REPORT_DONE), params)]
        if len(written) < len(outcomes):  # batch jobs, parents, or leases lost
            done = set(written)
            rest = [o for o in outcomes if o.job_id not in done]
            written += await self._report_settling(conn, owner, rest, now, tell_others)
        return written

    async def _report_settling(
        self,
        conn: Conn,
        owner: str,
        outcomes: Sequence[Outcome],
        now: float,
        tell_others: bool,
    ) -> list[JobId]:
        """Write any outcomes and, in their transaction, what follows from the jobs that
        ended (dependants released, holding jobs admitted)."""
        sql, params = self.sql(REPORT), _report_params(owner, outcomes, now)
        later = min(
            (o.run_at for o in outcomes if o.state is State.SCHEDULED and o.run_at is not None),
            default=None,
        )
        if not any(o.state.is_final or o.release for o in outcomes):
            rows = await fetch_all(conn, sql, params)
            requeued = {tenant for _, state, tenant, _ in rows if state == State.QUEUED}
            if tell_others and (requeued or later is not None):
                await self._notify(conn, requeued, later)
            return [row[0] for row in rows]
        ending = [o.job_id for o in outcomes if o.state.is_final or o.release]
        # One round trip for BEGIN, the outcomes and the ended jobs' dependencies (most have
        # none), another for what follows and COMMIT. The dependencies are read by a statement
        # of their own, after the outcomes' rows are locked: it sees every dependency on them
        # that a concurrent enqueue_dependent committed.
        async with conn.pipeline(), conn.transaction():
            reported = await conn.execute(sql, params)
            released = await conn.execute(self.sql(RELEASE_EDGES), {"ids": ending})
            rows = await reported.fetchall()
            edges = await released.fetchall()
            requeued = {tenant for _, state, tenant, _ in rows if state == State.QUEUED}
            ended = [job_id for job_id, state, _, _ in rows if State(state).is_final]
            freed = {tenant for _, state, tenant, kind in rows
                     if kind == Kind.BATCH and State(state).is_final}  # fmt: skip
            requeued |= await self._settle(conn, ended, freed, now, edges)
            if tell_others and (requeued or later is not None):
                await self._notify(conn, requeued, later)
        return [row[0] for row in rows]

    async def renew(self, owner: str, job_ids: Collection[JobId], lease_until: float) -> Renewal:
        params = {"owner": owner, "ids": list(job_ids), "lease_until": lease_until}
        ((aborted, lost, _),) = await self._run(self._select, self.sql(RENEW), params)
        return Renewal(aborted=aborted, lost=lost)

    async def recover(self, now: float, max_lease_expiries: int) -> Recovered:
        return await self._run(self._recover, now, max_lease_expiries)

    async def _recover(self, conn: Conn, now: float, max_lease_expiries: int) -> Recovered:
        recovered = Recovered(requeued=[], failed=[], aborted=[])
        async with conn.transaction():
            expired = await fetch_all(conn, self.sql(EXPIRED), {"now": now})
            if not expired:
                return recovered
            params: dict[str, list[Any]] = {"id": [], "state": [], "error": [], "finished_at": []}
            freed: set[str] = set()
            for job_id, attempts, expiries, abort_requested, kind, tenant in expired:
                error = lease_error(attempts, expiries + 1, max_lease_expiries, now)
                if abort_requested:
                    target, bucket = State.ABORTED, recovered.aborted
                elif expiries + 1 >= max_lease_expiries:
                    target, bucket = State.FAILED, recovered.failed
                else:
                    target, bucket = State.QUEUED, recovered.requeued
                params["id"].append(job_id)
                params["state"].append(str(target))
                params["error"].append(dumps(error, "error"))
                params["finished_at"].append(now if target.is_final else None)
                bucket.append(job_id)
                if kind == Kind.BATCH and target.is_final:
                    freed.add(tenant)
            await conn.execute(self.sql(RECOVER), params)
            ready = await self._settle(conn, recovered.failed + recovered.aborted, freed, now)
            if recovered.requeued or ready:
                await self._notify(conn, None, None)
        return recovered

    async def promote(self, now: float) -> tuple[list[str], float | None]:
        rows = await self._run(self._select, self.sql(PROMOTE), {"now": now})
        tenants, next_run_at, _ = rows[0]
        return list(tenants), next_run_at

    # -- control ----------------------------------------------------------------------------

    async def request_abort(self, job_id: JobId, now: float) -> State:
        return await self._run(self._request_abort, job_id, now)

    async def _request_abort(self, conn: Conn, job_id: JobId, now: float) -> State:
        async with conn.transaction():
            row = await fetch_one(
                conn, self.sql("SELECT kind, tenant FROM {s}.flexq_jobs WHERE id = %s"), (job_id,)
            )
            if row is None:
                raise JobNotFound(job_id)
            kind, tenant = row
            if kind == Kind.BATCH:  # before its row: an admission may be waiting for that
                await self._lock_tenants(conn, {tenant})
            row = await fetch_one(
                conn,
                self.sql("SELECT state FROM {s}.flexq_jobs WHERE id = %s FOR UPDATE"),
                (job_id,),
            )
            if row is None:
                raise JobNotFound(job_id)
            state = State(row[0])
            if state in RUNNING_STATES:
                await conn.execute(
                    self.sql("UPDATE {s}.flexq_jobs SET abort_requested = true WHERE id = %s"),
                    (job_id,),
                )
                return state
            check_transition(state, State.ABORTED, job_id)
            await conn.execute(
                self.sql(
                    "UPDATE {s}.flexq_jobs SET state = 'ABORTED', abort_requested = true,"
                    " finished_at = %s, position = NULL WHERE id = %s"
                ),
                (now, job_id),
            )
            if state is State.WAITING:
                await conn.execute(
                    self.sql("DELETE FROM {s}.flexq_dependencies WHERE child_id = %s"), (job_id,)
                )
            freed = {tenant} if kind == Kind.BATCH and state in ACTIVE_BATCH_STATES else set()
            if await self._settle(conn, [job_id], freed, now):
                await self._notify(conn, None, None)
        return State.ABORTED

    async def set_progress(self, owner: str, job_id: JobId, progress: str) -> bool:
        sql = self.sql(
            "UPDATE {s}.flexq_jobs SET progress = %s WHERE id = %s AND lease_owner = %s"
            " RETURNING id"
        )
        return bool(await self._run(self._select, sql, (progress, job_id, owner)))

    async def set_pause(self, scope: PauseScope, name: str, paused: bool, now: float) -> bool:
        return await self._run(self._set_pause, str(scope), name, paused, now)

    async def _set_pause(self, conn: Conn, scope: str, name: str, paused: bool, now: float) -> bool:
        if paused:
            cursor = await conn.execute(
                self.sql(
                    "INSERT INTO {s}.flexq_pauses (scope, name, since) VALUES (%s, %s, %s)"
                    " ON CONFLICT DO NOTHING"
                ),
                (scope, name, now),
            )
            return cursor.rowcount > 0
        async with conn.transaction():
            cursor = await conn.execute(
                self.sql("DELETE FROM {s}.flexq_pauses WHERE scope = %s AND name = %s"),
                (scope, name),
            )
            if cursor.rowcount > 0:
                await self._notify(conn, None, None)
        return cursor.rowcount > 0

    async def pauses(self) -> list[Pause]:
        sql = self.sql(
            "SELECT scope, name, since FROM {s}.flexq_pauses ORDER BY since, scope, name"
        )
        rows = await self._read(sql, ())
        return [
            Pause(PauseScope(scope), name, timestamp_to_datetime(since))
            for scope, name, since in rows
        ]

    async def prune(self, finished_before: float, limit: int) -> int:
        return await self._run(self._prune, finished_before, limit)

    async def _prune(self, conn: Conn, finished_before: float, limit: int) -> int:
        row = await fetch_one(conn, self.sql(PRUNE), {"before": finished_before, "limit": limit})
        return int(row[0]) if row else 0

    # -- worker processes -------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        sql = self.sql(
            "INSERT INTO {s}.flexq_workers (id, host, pid, workers, lease, started_at, last_seen)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
            " SET last_seen = excluded.last_seen, workers = excluded.workers RETURNING id"
        )
        await self._run(self._select, sql, tuple(worker))

    async def remove_worker(self, worker_id: str) -> None:
        sql = self.sql("DELETE FROM {s}.flexq_workers WHERE id = %s RETURNING id")
        await self._run(self._select, sql, (worker_id,))

    async def list_workers(self) -> list[WorkerRecord]:
        sql = self.sql(
            "SELECT id, host, pid, workers, lease, started_at, last_seen FROM {s}.flexq_workers"
            " ORDER BY started_at, id"
        )
        return [WorkerRecord(*row) for row in await self._read(sql, ())]

    async def prune_workers(self, seen_before: float) -> int:
        sql = self.sql("DELETE FROM {s}.flexq_workers WHERE last_seen < %s RETURNING id")
        return len(await self._run(self._select, sql, (seen_before,)))

    # -- queries ----------------------------------------------------------------------------

    @staticmethod
    async def _select(
        conn: Conn, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        return await fetch_all(conn, sql, params)

    async def get(self, job_id: JobId) -> JobInfo:
        sql = self.sql(f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id = %s")
        rows = await self._read(sql, (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return _info(rows[0])

    async def get_many(self, job_ids: Sequence[JobId]) -> list[JobInfo]:
        sql = self.sql(f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id = ANY(%b::text[])")
        rows = await self._read(sql, (list(dict.fromkeys(job_ids)),))
        return [_info(row) for row in rows]

    async def jobs(
        self, where: JobFilter, *, after_seq: int | None, offset: int, limit: int
    ) -> list[tuple[int, JobInfo]]:
        sql, params = select_jobs(where, after_seq)
        rows = await self._read(self.sql(sql), [*params, limit, offset])
        return [(row[0], _info(row)) for row in rows]

    async def counts(self, where: JobFilter) -> dict[State, int]:
        clause, params = _where(where)
        sql = self.sql(
            f"SELECT state, count(*) FROM {{s}}.flexq_jobs WHERE {clause} GROUP BY state"
        )
        rows = await self._read(sql, params)
        return {State(state): count for state, count in rows}

    # -- batch jobs, the holding queue and active slots -------------------------------------

    def set_limits(self, limits: LimitTable) -> None:
        self._limits = limits

    async def _lock_tenants(self, conn: Conn, tenants: Collection[str]) -> None:
        """Hold the tenants' slot and holding-queue locks until the transaction ends."""
        if tenants:
            params = {"prefix": self._lock_prefix, "tenants": sorted(tenants)}
            await conn.execute(self.sql(LOCK_TENANTS), params)

    def _hold_new(
        self, held: Mapping[str, list[JobId]]
    ) -> Generator[tuple[str, Any], tuple[Any, ...] | None, None]:
        """The statements that put new batch jobs in their (locked) tenants' holding queues and
        admit what the free slots take; raises LimitExceeded if a holding queue is then longer
        than its limit."""
        for tenant, job_ids in held.items():
            yield self.sql(HOLD), {"tenant": tenant, "step": HOLDING_STEP, "ids": job_ids}
        for tenant in held:
            limits = self._limits(tenant)
            usage = yield self.sql(USAGE), {"tenant": tenant}
            holding, active = usage or (0, 0)
            free = max(0, limits.max_active_batches - active)
            if holding - min(free, holding) > limits.max_holding:
                raise holding_full(tenant, limits.max_holding)
        if held:
            yield self.sql(ADMIT), self._admit_params(held)

    async def _admit(self, conn: Conn, tenants: Collection[str]) -> set[str]:
        """Admit the (locked) tenants' first HOLDING jobs into their free active slots; return
        the tenants that got some."""
        if not tenants:
            return set()
        rows = await fetch_all(conn, self.sql(ADMIT), self._admit_params(tenants))
        return {tenant for (tenant,) in rows}

    def _admit_params(self, tenants: Collection[str]) -> dict[str, Any]:
        ordered = sorted(tenants)
        slots = [self._limits(tenant).max_active_batches for tenant in ordered]
        return {"tenants": ordered, "slots": slots}

    async def _settle(
        self,
        conn: Conn,
        ended: list[JobId],
        freed: set[str],
        now: float,
        edges: list[tuple[Any, ...]] | None = None,
    ) -> set[str]:
        """After jobs ended, in their transaction: release or abort their dependants, then put
        released batch jobs in their holding queues and fill the free slots of ``freed``
        tenants (whose batch jobs ended) and of those. Returns the tenants that got QUEUED
        jobs. ``edges``: the ended jobs' dependencies, if the caller deleted them already
        (:data:`RELEASE_EDGES`)."""
        held, ready = await self._release_dependants(conn, ended, now, edges)
        tenants = freed | held.keys()
        await self._lock_tenants(conn, tenants)
        for tenant in sorted(held):
            params = {"tenant": tenant, "step": HOLDING_STEP, "ids": held[tenant]}
            await conn.execute(self.sql(HOLD), params)
        return ready | await self._admit(conn, tenants)

    async def admit(self, now: float) -> list[str]:
        return await self._run(self._admit_all)

    async def _admit_all(self, conn: Conn) -> list[str]:
        rows = await fetch_all(conn, self.sql(HOLDING_TENANTS))
        tenants = sorted(t for t, active in rows if active < self._limits(t).max_active_batches)
        admitted: set[str] = set()
        for start in range(0, len(tenants), ADMIT_CHUNK):
            chunk = tenants[start : start + ADMIT_CHUNK]
            async with conn.transaction():
                await self._lock_tenants(conn, chunk)
                chunk_admitted = await self._admit(conn, chunk)
                if chunk_admitted:
                    await self._notify(conn, chunk_admitted, None)
            admitted |= chunk_admitted
        return sorted(admitted)

    async def holding_order(self, tenant: str) -> list[JobId]:
        sql = self.sql(
            "SELECT id FROM {s}.flexq_jobs WHERE tenant = %s AND state = 'HOLDING'"
            " ORDER BY position"
        )
        return [job_id for (job_id,) in await self._read(sql, (tenant,))]

    async def reorder(self, job_id: JobId, placement: Placement) -> bool:
        return await self._run(self._reorder, job_id, placement)

    async def _reorder(self, conn: Conn, job_id: JobId, placement: Placement) -> bool:
        async with conn.transaction():
            row = await fetch_one(
                conn, self.sql("SELECT tenant FROM {s}.flexq_jobs WHERE id = %s"), (job_id,)
            )
            if row is None:
                raise JobNotFound(job_id)
            await self._lock_tenants(conn, {row[0]})
            tenant, position = await self._holding_row(conn, job_id)
            low, high = await self._bounds(conn, tenant, job_id, placement)
            if (low is None or low < position) and (high is None or position < high):
                return False
            new = _between(low, high)
            if new is None:
                await conn.execute(
                    self.sql(
                        "WITH ranked AS (SELECT seq, row_number() OVER (ORDER BY position) AS n"
                        " FROM {s}.flexq_jobs WHERE tenant = %s AND state = 'HOLDING')"
                        " UPDATE {s}.flexq_jobs AS j SET position = ranked.n * %s FROM ranked"
                        " WHERE j.seq = ranked.seq"
                    ),
                    (tenant, HOLDING_STEP),
                )
                low, high = await self._bounds(conn, tenant, job_id, placement)
                new = _between(low, high)
            await conn.execute(
                self.sql("UPDATE {s}.flexq_jobs SET position = %s WHERE id = %s"), (new, job_id)
            )
            return True

    async def _holding_row(self, conn: Conn, job_id: JobId) -> tuple[str, float]:
        found = await fetch_one(
            conn,
            self.sql("SELECT tenant, state, position FROM {s}.flexq_jobs WHERE id = %s"),
            (job_id,),
        )
        if found is None:
            raise JobNotFound(job_id)
        if found[1] != State.HOLDING:
            raise NotHolding(job_id, found[1])
        return found[0], found[2]

    async def _bounds(
        self, conn: Conn, tenant: str, job_id: JobId, placement: Placement
    ) -> tuple[float | None, float | None]:
        """The positions (of the other HOLDING jobs) between which the job is to go."""
        others = (
            "SELECT position FROM {s}.flexq_jobs"
            " WHERE tenant = %(tenant)s AND state = 'HOLDING' AND id <> %(id)s"
        )

        async def one(sql: str, **params: Any) -> float | None:
            row = await fetch_one(conn, self.sql(sql), {"tenant": tenant, "id": job_id, **params})
            return None if row is None else float(row[0])

        if placement.to == "front":
            return None, await one(others + " ORDER BY position LIMIT 1")
        if placement.to == "end":
            return await one(others + " ORDER BY position DESC LIMIT 1"), None
        if placement.to == "index":
            low = None
            if placement.place > 0:
                low = await one(others + " ORDER BY position LIMIT 1 OFFSET %(skip)s",
                          skip=placement.place - 1)  # fmt: skip
                if low is None:
                    return await one(others + " ORDER BY position DESC LIMIT 1"), None
                return low, await one(others + " AND position > %(low)s ORDER BY position LIMIT 1",
                                low=low)  # fmt: skip
            return None, await one(others + " ORDER BY position LIMIT 1")
        other = placement.other or ""
        other_tenant, anchor = await self._holding_row(conn, other)
        if other_tenant != tenant:
            raise InvalidArguments(
                f"job {other!r} is in tenant {other_tenant!r}'s holding queue, not {tenant!r}'s"
            )
        if other == job_id:
            raise InvalidArguments(f"cannot move job {job_id!r} {placement.to} itself")
        if placement.to == "before":
            before = " AND position < %(anchor)s ORDER BY position DESC LIMIT 1"
            return await one(others + before, anchor=anchor), anchor
        return anchor, await one(others + " AND position > %(anchor)s ORDER BY position LIMIT 1",
                           anchor=anchor)  # fmt: skip

    async def usage(self, tenant: str) -> tuple[int, int]:
        rows = await self._read(self.sql(USAGE), {"tenant": tenant})
        return rows[0][0], rows[0][1]

    async def wait_facts(self, job_id: JobId) -> WaitFacts:
        return await self._run(self._wait_facts, job_id)

    async def _wait_facts(self, conn: Conn, job_id: JobId) -> WaitFacts:
        async with conn.transaction():
            await conn.execute(_ONE_SNAPSHOT)
            found = await fetch_one(
                conn, self.sql(f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id = %s"), (job_id,)
            )
            if found is None:
                raise JobNotFound(job_id)
            info = _info(found)
            usage = await fetch_one(conn, self.sql(USAGE), {"tenant": info.tenant})
            holding, active = usage or (0, 0)
            position = ready_ahead = tenants_ahead = 0
            if info.state is State.HOLDING:
                row = await fetch_one(
                    conn,
                    self.sql(
                        "SELECT count(*) FROM {s}.flexq_jobs"
                        " WHERE tenant = %s AND state = 'HOLDING'"
                        " AND position < (SELECT position FROM {s}.flexq_jobs WHERE id = %s)"
                    ),
                    (info.tenant, job_id),
                )
                position = row[0] if row else 0
            if info.state is State.QUEUED:
                row = await fetch_one(
                    conn,
                    self.sql(
                        "SELECT count(*) FROM {s}.flexq_jobs"
                        " WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = %s"
                        " AND (-priority, kind_rank, seq) < (%s, %s, %s)"
                    ),
                    (info.tenant, -info.priority, info.kind.rank, found[0]),
                )
                ready_ahead = row[0] if row else 0
                row = await fetch_one(conn, self.sql(QUEUED_TENANTS), {"tenant": info.tenant})
                tenants_ahead = row[0] if row else 0
            pauses = await fetch_all(conn,
                self.sql("SELECT scope, name, since FROM {s}.flexq_pauses"
                         " ORDER BY since, scope, name")
            )  # fmt: skip
        return WaitFacts(
            info=info,
            holding_position=position if info.state is State.HOLDING else None,
            holding=holding,
            active_batches=active,
            ready_ahead=ready_ahead,
            tenants_ahead=tenants_ahead,
            pauses=tuple(
                Pause(PauseScope(scope), name, timestamp_to_datetime(since))
                for scope, name, since in pauses
            ),
        )

    async def begin_batch(self, owner: str, job_id: JobId) -> BatchCounts | None:
        return await self._run(self._begin_batch, owner, job_id)

    async def _begin_batch(self, conn: Conn, owner: str, job_id: JobId) -> BatchCounts | None:
        async with conn.transaction():
            row = await fetch_one(
                conn,
                self.sql(
                    f"SELECT {_COUNTS} FROM {{s}}.flexq_batches WHERE job_id = %(id)s"
                    f" AND EXISTS (SELECT FROM {{s}}.flexq_jobs WHERE {_HELD} FOR UPDATE)"
                ),
                {"id": job_id, "owner": owner},
            )
            if row is None:
                return None
            counts = BatchCounts(row[0], *row[1:])
            if counts.prepared:
                await conn.execute(
                    self.sql(
                        "UPDATE {s}.flexq_jobs SET state = 'PROCESSING'"
                        " WHERE id = %s AND state = 'PREPARING'"
                    ),
                    (job_id,),
                )
                return counts
            await conn.execute(
                self.sql("DELETE FROM {s}.flexq_chunks WHERE job_id = %s"), (job_id,)
            )
        return NO_BATCH_COUNTS

    async def add_chunks(
        self, owner: str, job_id: JobId, first: int, chunks: Sequence[tuple[int, str]]
    ) -> bool:
        params = {
            "id": job_id, "owner": owner, "first": first,
            "sizes": [size for size, _ in chunks], "items": [items for _, items in chunks],
        }  # fmt: skip
        rows = await self._run(self._select, self.sql(ADD_CHUNKS), params)
        return bool(rows[0][0])

    async def end_preparing(
        self, owner: str, job_id: JobId, total_items: int, chunks_total: int
    ) -> bool:
        params = {
            "id": job_id, "owner": owner, "total_items": total_items,
            "chunks_total": chunks_total,
        }  # fmt: skip
        return bool(await self._run(self._select, self.sql(END_PREPARING), params))

    async def pending_chunks(self, job_id: JobId, after: int, limit: int) -> list[tuple[int, str]]:
        sql = self.sql(
            "SELECT idx, items FROM {s}.flexq_chunks"
            f" WHERE job_id = %s AND idx > %s AND status = {CHUNK_PENDING} ORDER BY idx LIMIT %s"
        )
        return [(idx, items) for idx, items in await self._read(sql, (job_id, after, limit))]

    async def checkpoint(self, owner: str, job_id: JobId, done: Sequence[ChunkDone]) -> bool:
        params = {
            "id": job_id, "owner": owner, "chunk": [d.chunk for d in done],
            "items": [d.items for d in done], "error": [d.error for d in done],
        }  # fmt: skip
        rows = await self._run(self._select, self.sql(CHECKPOINT), params)
        return bool(rows[0][0])

    async def batch_summary(self, job_id: JobId) -> tuple[BatchCounts, list[tuple[int, str]]]:
        return await self._run(self._batch_summary, job_id)

    async def _batch_summary(
        self, conn: Conn, job_id: JobId
    ) -> tuple[BatchCounts, list[tuple[int, str]]]:
        async with conn.transaction():
            await conn.execute(_ONE_SNAPSHOT)
            found = await fetch_one(
                conn,
                self.sql(f"SELECT {_COUNTS} FROM {{s}}.flexq_batches WHERE job_id = %s"),
                (job_id,),
            )
            if found is None:
                raise JobNotFound(job_id)
            errors = await fetch_all(
                conn,
                self.sql(
                    "SELECT idx, error FROM {s}.flexq_chunks"
                    f" WHERE job_id = %s AND status = {CHUNK_FAILED} ORDER BY idx"
                ),
                (job_id,),
            )
        return BatchCounts(found[0], *found[1:]), [(idx, error) for idx, error in errors]

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRecord, now: float) -> ScheduleRecord:
        values = (
            schedule.name, schedule.tenant, schedule.cron, schedule.timezone, schedule.task,
            schedule.args, schedule.kwargs, schedule.misfire, schedule.reserve, schedule.state,
            schedule.next_fire_time, now,
        )  # fmt: skip
        rows = await self._run(self._select, self.sql(PUT_SCHEDULE), values)
        return _schedule(rows[0])

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        sql = self.sql(f"SELECT {_SCHEDULE_COLUMNS} FROM {{s}}.flexq_schedules WHERE name = %s")
        rows = await self._read(sql, (name,))
        return _schedule(rows[0]) if rows else None

    async def list_schedules(self, tenant: str | None) -> list[ScheduleRecord]:
        sql = f"SELECT {_SCHEDULE_COLUMNS} FROM {{s}}.flexq_schedules"
        params: tuple[str, ...] = ()
        if tenant is not None:
            sql, params = sql + " WHERE tenant = %s", (tenant,)
        rows = await self._read(self.sql(sql + " ORDER BY name"), params)
        return [_schedule(row) for row in rows]

    async def due_schedules(
        self, tasks: Collection[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        return await self._run(self._due_schedules, sorted(tasks), now)

    async def _due_schedules(
        self, conn: Conn, tasks: list[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        params = {"now": now, "tasks": tasks}
        due = await fetch_all(conn, self.sql(DUE_SCHEDULES), params)
        later = await fetch_one(conn, self.sql(NEXT_SCHEDULE), params)
        return [_schedule(row) for row in due], later[0] if later else None

    async def fire_schedule(
        self,
        name: str,
        revision: int,
        firing: ScheduleFiring,
        jobs: Sequence[NewJob],
        now: float,
    ) -> bool:
        return await self._run(self._fire_schedule, name, revision, firing, list(jobs), now)

    async def _fire_schedule(
        self,
        conn: Conn,
        name: str,
        revision: int,
        firing: ScheduleFiring,
        jobs: list[NewJob],
        now: float,
    ) -> bool:
        values = (
            firing.next_fire_time, firing.previous_fire_time, len(jobs), firing.last_job_id,
            name, revision,
        )  # fmt: skip
        async with conn.transaction():
            if (await conn.execute(self.sql(FIRE_SCHEDULE), values)).rowcount == 0:
                return False
            await self._insert(conn, jobs, now)
        return True

    async def set_schedule_state(
        self, name: str, revision: int, state: str, next_fire_time: float | None
    ) -> ScheduleRecord | None:
        sql = self.sql(
            "UPDATE {s}.flexq_schedules SET state = %s, next_fire_time = %s,"
            " revision = revision + 1"
            f" WHERE name = %s AND revision = %s RETURNING {_SCHEDULE_COLUMNS}"
        )
        rows = await self._run(self._select, sql, (state, next_fire_time, name, revision))
        return _schedule(rows[0]) if rows else None

    async def delete_schedule(self, name: str) -> bool:
        sql = self.sql("DELETE FROM {s}.flexq_schedules WHERE name = %s RETURNING name")
        return bool(await self._run(self._select, sql, (name,)))

    # -- dependencies and chains -------------------------------------------------------------

    async def enqueue_dependent(self, jobs: Sequence[DependentJob], now: float) -> list[JobId]:
        return await self._run(self._enqueue_dependent, list(jobs), now)

    async def _enqueue_dependent(
        self, conn: Conn, jobs: list[DependentJob], now: float
    ) -> list[JobId]:
        async with conn.transaction():
            await self._lock_tenants(conn, {d.job.tenant for d in jobs if d.job.kind is Kind.BATCH})
            parents = sorted({parent for dependent in jobs for parent in dependent.parents})
            states: dict[JobId, State] = {
                job_id: State(state)
                for job_id, state in await fetch_all(conn, self.sql(LOCK_PARENTS), (parents,))
            }
            new: list[NewJob] = []
            new_states: list[State] = []
            edges: list[tuple[JobId, JobId, str]] = []
            aborted: list[tuple[JobId, str]] = []
            held: dict[str, list[JobId]] = {}
            for dependent in jobs:
                job = dependent.job
                waiting: list[JobId] = []
                failed: tuple[JobId, State] | None = None
                for parent in dependent.parents:
                    parent_state = states.get(parent)
                    if parent_state is None:
                        raise JobNotFound(parent)
                    if not parent_state.is_final:
                        waiting.append(parent)
                    elif (
                        parent_state is not State.COMPLETED
                        and dependent.on_parent_failure == "abort"
                    ):
                        failed = failed or (parent, parent_state)
                state = _initial_state(job, now)
                if failed is not None:
                    state = State.ABORTED
                    error = parent_failed_error(failed[0], failed[1], now)
                    aborted.append((job.id, dumps(error, "error")))
                elif waiting:
                    state = State.WAITING
                    policy = dependent.on_parent_failure
                    edges.extend((parent, job.id, policy) for parent in waiting)
                elif state is State.HOLDING:
                    held.setdefault(job.tenant, []).append(job.id)
                new.append(job)
                new_states.append(state)
                states[job.id] = state
            await conn.execute(self.sql(_INSERT), _insert_params(new, now, new_states))
            batches = [job.id for job in new if job.kind is Kind.BATCH]
            if batches:
                await conn.execute(self.sql(_ADD_BATCHES), (batches,))
            await _run_steps(conn, self._hold_new(held))
            if edges:
                await conn.execute(
                    self.sql(
                        "INSERT INTO {s}.flexq_dependencies (parent_id, child_id,"
                        " on_parent_failure) SELECT * FROM unnest(%b::text[], %b::text[],"
                        " %b::text[]) ON CONFLICT DO NOTHING"
                    ),
                    ([e[0] for e in edges], [e[1] for e in edges], [e[2] for e in edges]),
                )
            if aborted:
                await conn.execute(
                    self.sql(
                        "UPDATE {s}.flexq_jobs AS j SET finished_at = %(now)s,"
                        " errors = '[' || v.error || ']'"
                        " FROM unnest(%(id)b::text[], %(error)b::text[]) AS v(id, error)"
                        " WHERE j.id = v.id"
                    ),
                    {"now": now, "id": [a[0] for a in aborted], "error": [a[1] for a in aborted]},
                )
            queued = [job for job, state in zip(new, new_states, strict=True)
                      if state is State.QUEUED]  # fmt: skip
            if queued and self._tell_others(len(queued)):
                await self._notify(conn, {job.tenant for job in queued}, None)
        return [dependent.job.id for dependent in jobs]

    async def _release_dependants(
        self,
        conn: Conn,
        finished: list[JobId],
        now: float,
        edges: list[tuple[Any, ...]] | None,
    ) -> tuple[dict[str, list[JobId]], set[str]]:
        """Release or abort the WAITING dependants of jobs that just became final.

        A dependant with no parent left becomes QUEUED (SCHEDULED until its run_at); one whose
        parent failed ends ABORTED with an error naming the parent (unless its policy is
        "run"), and its own dependants are dealt with in turn. Returns the released batch jobs
        by tenant, in the order they join their holding queues (the caller locks the tenants
        and puts them there, even in a full one), and the tenants that got QUEUED jobs.
        """
        held: dict[str, list[JobId]] = {}
        ready: set[str] = set()
        while edges or finished:
            if edges is None:
                edges = await fetch_all(conn, self.sql(RELEASE_EDGES), {"ids": finished})
            if not edges:
                break
            states = {parent: State(state) for parent, _, _, state in edges}
            finished = []
            children = sorted({child for _, child, _, _ in edges})
            # Locked before their remaining edges are read: of two transactions that end two
            # parents of one child, the second sees the first's deleted edge.
            await conn.execute(
                self.sql(
                    "SELECT 1 FROM {s}.flexq_jobs WHERE id = ANY(%b::text[]) ORDER BY id FOR UPDATE"
                ),
                (children,),
            )
            failed_parent: dict[JobId, JobId] = {}
            for parent, child, policy, _ in sorted(edges):
                if states[parent] is not State.COMPLETED and policy == "abort":
                    failed_parent.setdefault(child, parent)
            if failed_parent:
                ids = sorted(failed_parent)
                await conn.execute(
                    self.sql("DELETE FROM {s}.flexq_dependencies WHERE child_id = ANY(%s)"),
                    (ids,),
                )
                errors = [
                    dumps(parent_failed_error(failed_parent[c], states[failed_parent[c]], now),
                          "error")
                    for c in ids
                ]  # fmt: skip
                rows = await fetch_all(
                    conn, self.sql(ABORT_WAITING), {"id": ids, "error": errors, "now": now}
                )
                finished += [job_id for (job_id,) in rows]
            released = [child for child in children if child not in failed_parent]
            if released:
                rows = await fetch_all(
                    conn, self.sql(RELEASE_WAITING), {"ids": released, "now": now}
                )
                for job_id, tenant, kind, state in sorted(rows):
                    if kind == Kind.BATCH:
                        held.setdefault(tenant, []).append(job_id)
                    elif state == State.QUEUED:
                        ready.add(tenant)
            edges = None
        return held, ready

    async def waiting_for(self, job_id: JobId) -> list[JobId]:
        return await self._run(self._waiting_for, job_id)

    async def _waiting_for(self, conn: Conn, job_id: JobId) -> list[JobId]:
        async with conn.transaction():
            if not await fetch_one(
                conn, self.sql("SELECT 1 FROM {s}.flexq_jobs WHERE id = %s"), (job_id,)
            ):
                raise JobNotFound(job_id)
            rows = await fetch_all(
                conn,
                self.sql(
                    "SELECT parent_id FROM {s}.flexq_dependencies WHERE child_id = %s"
                    " ORDER BY parent_id"
                ),
                (job_id,),
            )
        return [parent_id for (parent_id,) in rows]

    async def claim_jobs(
        self,
        owner: str,
        job_ids: Collection[JobId],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        if not job_ids or not tasks:
            return []
        params = {
            "ids": list(job_ids), "tasks": sorted(tasks), "now": now, "owner": owner,
            "lease_until": lease_until,
        }  # fmt: skip
        rows = await self._run(self._select, self.sql(CLAIM_JOBS), params)
        return sorted(map(_claimed, rows), key=_by_order)

    async def chain(self, job_id: JobId) -> list[JobInfo]:
        rows = await self._read(self.sql(CHAIN), {"id": job_id})
        if not rows:
            raise JobNotFound(job_id)
        return [_info(row) for row in rows]


def _listen_retry(delay: float, error: psycopg.Error, listening_since: float | None) -> float:
    """How long to wait before the LISTEN connection is opened again, after ``delay``, when
    the last one failed (having listened since ``listening_since``, if it got that far)."""
    low, high = LISTEN_BACKOFF
    if listening_since is not None and time.monotonic() - listening_since >= LISTEN_STEADY:
        delay = 0.0
    delay = min(max(2 * delay, low), high)
    log.warning("LISTEN connection lost, reconnecting", error=repr(error), retry_in=delay)
    return delay


class _Listener:
    """The LISTEN connection of :meth:`PostgresStore.listen` under trio, served by a thread of
    its own.

    Notifications sent by the store's own connections are dropped: this process's dispatcher
    heard of that work in-process already.
    """

    def __init__(
        self, store: PostgresStore, wake: Callable[[list[str] | None, float | None], None]
    ) -> None:
        self._store = store
        self._wake = wake
        self._pending: list[tuple[list[str] | None, float | None]] = []
        self._lock = threading.Lock()
        self._deliver = _threadsafe(self._deliver_pending)
        self._stop_read, self._stop_write = os.pipe()
        self._listening_since: float | None = None

    def stop(self) -> None:
        os.write(self._stop_write, b"x")

    def close(self) -> None:
        """Once the thread has ended (whatever ended it), and not before: stop() may still
        write to the pipe."""
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _deliver_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for tenants, run_at in pending:
            self._wake(tenants, run_at)

    def _post(self, tenants: list[str] | None, run_at: float | None) -> None:
        with self._lock:
            self._pending.append((tenants, run_at))
        self._deliver()

    def serve(self) -> None:
        delay = 0.0
        first = True
        while not self._sleep(delay):
            self._listening_since = None
            try:
                self._listen(first)
                return
            except psycopg.Error as exc:
                delay = _listen_retry(delay, exc, self._listening_since)
            first = False

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True if asked to stop meanwhile."""
        return bool(readable([self._stop_read], seconds))

    def _listen(self, first: bool) -> None:
        """LISTEN and pass notifications on until asked to stop (or the connection fails)."""
        store = self._store
        with store._connect() as conn:
            conn.execute(f'LISTEN "{store.channel}"')
            self._listening_since = time.monotonic()
            if not first:
                self._post(None, None)  # notifications may have been missed meanwhile
            while True:
                ready = readable([conn.fileno(), self._stop_read], LISTEN_PING)
                if self._stop_read in ready:
                    return
                if not ready:
                    conn.execute("SELECT 1")  # a dead peer shows up here
                # Also those that came during the ping, which psycopg kept aside.
                for note in conn.notifies(timeout=0.0):
                    if note.pid not in store.backend_pids:
                        self._post(*_parse_payload(note.payload))


_BEGIN_IMPLICITLY = "SELECT 'flexq joins the transaction'"
"""Run on a connection that is not in autocommit mode and not in a transaction, any statement
begins one (psycopg sends BEGIN first): the jobs then join it, and psycopg's transaction
blocks inside it are savepoints, not transactions of their own that commit at once."""


def _inserted_or_duplicate(job: NewJob, unit: EnqueueUnit, row: tuple[Any, ...]) -> JobId:
    """The id a keyed insert gave: the job's, or the holder's (or raise DuplicateJob)."""
    job_id, inserted = row
    if not inserted and unit.on_duplicate == "raise":
        raise DuplicateJob(job.tenant, job.key or "", job_id)
    return job_id  # type: ignore[no-any-return]


def _payload(tenants: Collection[str] | None, run_at: float | None) -> str:
    if tenants is None:
        return ""
    text = json.dumps({"tenants": sorted(tenants), "run_at": run_at}, separators=(",", ":"))
    return text if len(text.encode()) <= MAX_PAYLOAD else ""


def _parse_payload(payload: str) -> tuple[list[str] | None, float | None]:
    try:
        data = json.loads(payload)
        return [str(t) for t in data["tenants"]], data["run_at"]
    except (ValueError, TypeError, KeyError):
        return None, None


async def _run_steps(conn: Conn, steps: Generator[tuple[str, Any], tuple[Any, ...] | None, T]) -> T:
    """Run statements one after the other, each given the first row of the one before."""
    row: tuple[Any, ...] | None = None
    try:
        while True:
            sql, params = steps.send(row)
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone() if cursor.description else None
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _plain(job: NewJob) -> bool:
    """Whether the job is inserted as it is: no key to look up, no holding queue to join."""
    return job.key is None and job.kind is not Kind.BATCH


def _claimable_alone(
    units: Sequence[EnqueueUnit], claim: ClaimRequest, now: float
) -> NewJob | None:
    """The job of an enqueue that :data:`INSERT_CLAIMED` writes: the only one, plain, ready,
    and of a tenant and a task the claim asks for."""
    if len(units) != 1 or len(units[0].jobs) != 1:
        return None
    (job,) = units[0].jobs
    if not _plain(job) or job.run_at > now or job.task not in claim.tasks:
        return None
    return job if claim.wanted.get(job.tenant, 0) > 0 else None


def _initial_state(job: NewJob, now: float) -> State:
    """The state a new job enters (a batch job HOLDING, until it has a place and a slot)."""
    if job.kind is Kind.BATCH:
        return State.HOLDING
    return State.QUEUED if job.run_at <= now else State.SCHEDULED


def _insert_one_params(job: NewJob, now: float) -> dict[str, Any]:
    return {
        "now": now, "id": job.id, "task": job.task, "kind": str(job.kind),
        "kind_rank": job.kind.rank, "tenant": job.tenant, "priority": job.priority,
        "state": str(_initial_state(job, now)), "args": job.args,
        "kwargs": job.kwargs, "max_attempts": job.max_attempts, "timeout": job.timeout,
        "run_at": job.run_at, "parent_id": job.parent_id, "key": job.key,
    }  # fmt: skip


def _insert_params(
    jobs: Sequence[NewJob], now: float, states: Sequence[State] | None = None
) -> dict[str, Any]:
    if states is None:
        states = [_initial_state(job, now) for job in jobs]
    return {
        "now": now,
        "id": [job.id for job in jobs],
        "task": [job.task for job in jobs],
        "kind": [str(job.kind) for job in jobs],
        "kind_rank": [job.kind.rank for job in jobs],
        "tenant": [job.tenant for job in jobs],
        "priority": [job.priority for job in jobs],
        "state": [str(state) for state in states],
        "args": [job.args for job in jobs],
        "kwargs": [job.kwargs for job in jobs],
        "max_attempts": [job.max_attempts for job in jobs],
        "timeout": [job.timeout for job in jobs],
        "run_at": [job.run_at for job in jobs],
        "parent_id": [job.parent_id for job in jobs],
        "key": [job.key for job in jobs],
    }


_KINDS = {str(kind): kind for kind in Kind}
"""Kinds by their stored names: a lookup costs a tenth of ``Kind(name)``, once per job claimed."""


def _claimed(row: tuple[Any, ...]) -> ClaimedJob:
    return ClaimedJob(
        id=row[0], task=row[1], kind=_KINDS[row[2]], tenant=row[3], priority=row[4],
        args=row[5], kwargs=row[6], attempt=row[7], max_attempts=row[8], timeout=row[9],
        parent_id=row[10], order=(-row[4], row[11], row[12]),
    )  # fmt: skip


def _done(outcome: Outcome) -> bool:
    """Whether :data:`REPORT_DONE` can write the outcome."""
    return (
        outcome.state is State.COMPLETED
        and outcome.result is None
        and not outcome.release
        and not outcome.callouts
    )


def _report_params(owner: str, outcomes: Sequence[Outcome], now: float) -> dict[str, Any]:
    return {
        "id": [o.job_id for o in outcomes],
        "state": [str(o.state) for o in outcomes],
        "result": [o.result for o in outcomes],
        "error": [o.error for o in outcomes],
        "run_at": [o.run_at for o in outcomes],
        "release": [o.release for o in outcomes],
        "retry": [o.state in (State.QUEUED, State.SCHEDULED) and not o.release
                  for o in outcomes],
        "final": [o.state.is_final and not o.release for o in outcomes],
        "callouts": [o.callouts for o in outcomes],
        "owner": owner,
        "now": now,
    }  # fmt: skip


def _claim_params(claim: ClaimRequest, now: float) -> dict[str, Any] | None:
    """The parameters of :data:`CLAIM`, or None if it would claim nothing."""
    asked = {tenant: count for tenant, count in claim.wanted.items() if count > 0}
    if not asked or not claim.tasks:
        return None
    return {
        "tasks": sorted(claim.tasks), "tenants": list(asked), "counts": list(asked.values()),
        "now": now, "owner": claim.owner, "lease_until": claim.lease_until,
    }  # fmt: skip


def _by_order(job: ClaimedJob) -> tuple[int, int, int]:
    return job.order


def select_jobs(where: JobFilter, after_seq: int | None) -> tuple[str, list[Any]]:
    """The query of :meth:`PostgresStore.jobs` and its parameters, but LIMIT and OFFSET."""
    clause, params = _where(where)
    if after_seq is not None:
        clause += " AND seq > %s"
        params.append(after_seq)
    order = "ORDER BY seq LIMIT %s OFFSET %s"
    return f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE {clause} {order}", params


def _where(where: JobFilter) -> tuple[str, list[Any]]:
    clauses = ["true"]
    params: list[Any] = []
    if where.state is not None:
        # A literal, not a parameter: the planner can then use the partial indexes by state.
        clauses.append(f"state = '{State(where.state)}'")
    for column, value in (("tenant", where.tenant), ("kind", where.kind), ("task", where.task)):
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(str(value))
    if where.created_after is not None:
        clauses.append("created_at >= %s")
        params.append(where.created_after)
    if where.created_before is not None:
        clauses.append("created_at < %s")
        params.append(where.created_before)
    return " AND ".join(clauses), params


def _info(row: tuple[Any, ...]) -> JobInfo:
    return job_info(
        id=row[1], task=row[2], kind=row[3], tenant=row[4], priority=row[5], state=row[6],
        args=row[7], kwargs=row[8], attempts=row[9], max_attempts=row[10], created_at=row[11],
        run_at=row[12], started_at=row[13], finished_at=row[14], result=row[15], errors=row[16],
        parent_id=row[17], key=row[18], progress=row[19], abort_requested=row[20],
        batch=None if row[21] is None else BatchCounts(row[21], *row[22:27]),
        callouts=row[27],
    )  # fmt: skip


def _between(low: float | None, high: float | None) -> float | None:
    """A position strictly between two (None: open end), or None if the gap is too small."""
    if low is None and high is None:
        return HOLDING_STEP
    if low is None:
        return high - HOLDING_STEP  # type: ignore[operator]
    if high is None:
        return low + HOLDING_STEP
    middle = (low + high) / 2
    return middle if low < middle < high else None


def _schedule(row: tuple[Any, ...]) -> ScheduleRecord:
    return ScheduleRecord(
        name=row[0], tenant=row[1], cron=row[2], timezone=row[3], task=row[4], args=row[5],
        kwargs=row[6], misfire=row[7], reserve=row[8], state=row[9],
        next_fire_time=row[10], previous_fire_time=row[11], times_triggered=row[12],
        last_job_id=row[13], revision=row[14], created_at=row[15],
    )  # fmt: skip
