"""The PostgreSQL queries that choose work use their indexes on a table of 1,000,000 jobs (a plan
regression fails here, not a timer)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from flexq import State
from flexq._store import postgres as pg
from flexq._store._pg_connections import BlockingConnection, run_blocking
from flexq.abc import JobFilter

from .conftest import POSTGRES_DSN

if TYPE_CHECKING:
    from collections.abc import Iterator

ROWS = 1_000_000
STORE = pg.PostgresStore(POSTGRES_DSN, schema=f"flexq_test_plans_{uuid.uuid4().hex[:12]}")

# Per ten jobs: 6 QUEUED (one in a hundred of them a suspect), 2 COMPLETED, 1 SCHEDULED,
# 1 PROCESSING; over 10 tenants, 3 tasks and 100 lease owners.
FILL = """
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, created_at, run_at, finished_at, lease_owner, lease_until, lease_expiries)
SELECT 'j' || i, 'task' || (i % 3), 'queueable', 1, 't' || (i % 10), i % 4,
    (ARRAY['QUEUED', 'QUEUED', 'QUEUED', 'QUEUED', 'QUEUED', 'QUEUED', 'COMPLETED',
           'COMPLETED', 'SCHEDULED', 'PROCESSING'])[i % 10 + 1],
    '[]', '{{}}', 1, i, CASE WHEN i % 10 = 8 THEN 2e9 + i ELSE i END,
    CASE WHEN i % 10 IN (6, 7) THEN i END,
    CASE WHEN i % 10 = 9 THEN 'o' || (i % 100) END,
    CASE WHEN i % 10 = 9 THEN 2e9 + i END,
    CASE WHEN i % 1000 = 0 THEN 1 ELSE 0 END
FROM generate_series(1, {rows}) AS i
"""


# Batch jobs of the same 10 tenants: one in twenty in an active slot, the others HOLDING.
BATCHES = """
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, created_at, run_at, position)
SELECT 'b' || i, 'task0', 'batch', 2, 't' || (i % 10), 0,
    CASE WHEN i % 20 = 0 THEN 'QUEUED' ELSE 'HOLDING' END, '[]', '{{}}', 1, i, i,
    CASE WHEN i % 20 <> 0 THEN i * 1024.0 END
FROM generate_series(1, {rows}) AS i
"""


@pytest.fixture(scope="module")
def conn() -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A connection to a schema that holds a million jobs, with fresh planner statistics."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        try:
            run_blocking(STORE._migrate(BlockingConnection(connection)))
            connection.execute(STORE.sql(FILL.format(s="{s}", rows=ROWS)))
            connection.execute(STORE.sql(BATCHES.format(s="{s}", rows=ROWS // 20)))
            connection.execute(STORE.sql("ANALYZE {s}.flexq_jobs"))
            yield connection
        finally:
            connection.execute(STORE.sql("DROP SCHEMA IF EXISTS {s} CASCADE"))


def plan(conn: psycopg.Connection[tuple[Any, ...]], sql: str, params: dict[str, Any]) -> str:
    rows = conn.execute("EXPLAIN " + STORE.sql(sql), params).fetchall()
    return "\n".join(row[0] for row in rows)


TAKE = {"now": 1.0, "owner": "o", "lease_until": 2.0}


@pytest.mark.slow
def test_claim_reads_each_tenant_and_task_off_the_ready_index(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """A claim probes flexq_jobs_ready once per (tenant, task) and never scans the table."""
    params = {"tasks": ["task0", "task1"], "tenants": ["t1", "t2"], "counts": [8, 8], **TAKE}
    text = plan(conn, pg.CLAIM, params)
    assert "Index Scan using flexq_jobs_ready on flexq_jobs" in text, text
    assert "Seq Scan on flexq_jobs" not in text, text
    assert "LockRows" in text, text


@pytest.mark.slow
def test_a_job_inserted_claimed_looks_for_others_in_the_ready_index(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """The insert of an idle queue's job probes flexq_jobs_ready for jobs of its tenant that
    wait, and never scans the table."""
    params = {
        "id": "new", "task": "task0", "kind": "queueable", "kind_rank": 1, "tenant": "t1",
        "priority": 0, "args": "[]", "kwargs": "{}", "max_attempts": 1, "timeout": None,
        "run_at": 1.0, "parent_id": None, "tasks": ["task0", "task1"], **TAKE,
    }  # fmt: skip
    text = plan(conn, pg.INSERT_CLAIMED, params)
    assert "using flexq_jobs_ready on flexq_jobs" in text, text
    assert "Seq Scan on flexq_jobs" not in text, text


@pytest.mark.slow
def test_ready_tenants_and_suspects_use_their_partial_indexes(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """Tenants with ready work come from a loose scan of flexq_jobs_ready; suspects from
    flexq_jobs_suspects."""
    text = plan(conn, pg.READY_TENANTS, {"tasks": ["task0", "task1"]})
    assert "Index Only Scan using flexq_jobs_ready on flexq_jobs" in text, text
    assert "Seq Scan on flexq_jobs" not in text, text
    assert "Hash" not in text, text
    for sql in (pg.HAS_SUSPECTS, pg.CLAIM_SUSPECT):
        text = plan(conn, sql, {"tasks": ["task0"], **TAKE})
        assert "flexq_jobs_suspects" in text, text
        assert "Seq Scan on flexq_jobs" not in text, text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sql", "params", "index"),
    [
        (pg.PROMOTE, {"now": 5.0}, "flexq_jobs_scheduled"),
        (pg.EXPIRED, {"now": 5.0}, "flexq_jobs_leases"),
        (
            pg.RENEW,
            {"owner": "o9", "ids": [f"j{i}" for i in range(9, 1000, 10)], "lease_until": 9.0},
            "flexq_jobs_id_key",
        ),
        (pg.PRUNE, {"before": 5.0, "limit": 500}, "flexq_jobs_finished"),
    ],
    ids=["promote", "recover", "renew", "prune"],
)
def test_upkeep_statements_use_their_partial_indexes(
    conn: psycopg.Connection[tuple[Any, ...]], sql: str, params: dict[str, Any], index: str
) -> None:
    """Promotion, recovery and pruning find their rows through their own indexes, renewal
    through the ids of the jobs it renews."""
    text = plan(conn, sql, params)
    assert index in text, text
    assert "Seq Scan on flexq_jobs" not in text, text


@pytest.mark.slow
def test_listing_failed_jobs_reads_their_partial_index(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """Listing the jobs of a rare final state does not walk the million others."""
    sql, params = pg.select_jobs(JobFilter(state=State.FAILED), after_seq=None)
    rows = conn.execute("EXPLAIN " + STORE.sql(sql), [*params, 100, 0]).fetchall()
    text = "\n".join(row[0] for row in rows)
    assert "flexq_jobs_failed" in text, text


@pytest.mark.slow
def test_admission_reads_the_holding_and_active_batch_indexes(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """Admission, usage and the holding tenants read the partial indexes of HOLDING jobs and of
    batch jobs in active slots."""
    text = plan(conn, pg.ADMIT, {"tenants": ["t1", "t2"], "slots": [5, 5]})
    assert "flexq_jobs_holding" in text, text
    assert "flexq_jobs_active_batches" in text, text
    assert "Seq Scan on flexq_jobs" not in text, text
    for sql, params in ((pg.USAGE, {"tenant": "t1"}), (pg.HOLDING_TENANTS, {})):
        text = plan(conn, sql, params)
        assert "flexq_jobs_holding" in text, text
        assert "flexq_jobs_active_batches" in text, text
        assert "Seq Scan on flexq_jobs" not in text, text


@pytest.mark.slow
def test_a_report_of_completed_jobs_finds_them_by_id(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> None:
    """The short report of jobs that completed without a value probes the unique index of ids."""
    text = plan(conn, pg.REPORT_DONE, {"id": ["j9", "j19"], "owner": "o9", "now": 5.0})
    assert "flexq_jobs_id_key" in text, text
    assert "Seq Scan on flexq_jobs" not in text, text


def test_ready_tenants_probe_each_tenant_before_statistics_catch_up(pg_schema: str) -> None:
    """A backlog that grew faster than the planner's statistics (none yet, here) is still read
    one probe per tenant and task, not hashed whole at every poll."""
    store = pg.PostgresStore(POSTGRES_DSN, schema=pg_schema)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        run_blocking(store._migrate(BlockingConnection(connection)))
        connection.execute(store.sql(BACKLOG))
        connection.execute("SET plan_cache_mode = force_generic_plan")  # as the store plans
        rows = connection.execute(
            "EXPLAIN " + store.sql(pg.READY_TENANTS), {"tasks": ["task0", "task1"]}
        ).fetchall()
    text = "\n".join(row[0] for row in rows)
    assert "Index Only Scan using flexq_jobs_ready on flexq_jobs" in text, text
    assert "Hash" not in text, text


BACKLOG = """
INSERT INTO {s}.flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,
    max_attempts, created_at, run_at)
SELECT 'j' || i, 'task0', 'queueable', 1, 'default', 0, 'QUEUED', '[]', '{}', 1, i, i
FROM generate_series(1, 130000) AS i
"""
