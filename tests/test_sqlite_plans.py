"""The SQLite queries that choose work use their indexes (a plan regression fails here)."""

from __future__ import annotations

import sqlite3

import pytest

from flexq._store import sqlite as store_sql


@pytest.fixture
def db() -> sqlite3.Connection:
    """An empty flexq schema with the planner's statistics of a large backlog."""
    connection = sqlite3.connect(":memory:")
    for statement in store_sql._SCHEMA.split(";"):
        if statement.strip():
            connection.execute(statement)
    return connection


def plan(db: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> str:
    return " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_claim_seeks_the_ready_index_by_tenant(db: sqlite3.Connection) -> None:
    """Claiming reads each task's best jobs of a tenant straight off the partial ready index."""
    text = plan(db, store_sql.claim_sql(3), (1.0, "o", 2.0, "acme", 8, "t", "u", "v"))
    assert text.count("USING INDEX flexq_jobs_ready (tenant=? AND task=?)") == 3
    assert "SCAN flexq_jobs " not in text + " "


def test_ready_tenants_is_a_loose_index_scan(db: sqlite3.Connection) -> None:
    """Listing tenants with ready work seeks tenant by tenant, never reading every job."""
    text = plan(db, store_sql._READY_TENANTS, ("t",))
    assert "flexq_jobs_ready_tasks (task=? AND tenant>?)" in text
    assert "SCAN flexq_jobs " not in text + " "


def test_suspects_and_promotion_and_recovery_use_partial_indexes(db: sqlite3.Connection) -> None:
    """Suspects, due scheduled jobs and expired leases are found through their own indexes,
    the jobs whose leases are renewed by their ids."""
    suspect_sql = store_sql._CLAIM_SUSPECT.format(
        suspect=store_sql._SUSPECT.format(marks="?4", paused_tenants=store_sql._PAUSED_TENANTS)
    )
    assert "flexq_jobs_suspects" in plan(db, suspect_sql, (1.0, "o", 2.0, "t"))
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    store = store_sql.SQLiteStore(":memory:")
    store._conn = db
    store._promote(1.0)
    store._recover(1.0, 3)
    store._renew("owner", ["a", "b"], 2.0)
    db.set_trace_callback(None)
    plans = [plan(db, sql, ()) for sql in statements if sql.lstrip().startswith(("SELECT", "UPD"))]
    assert len(plans) == 4
    *upkeep, renew = plans
    assert all("flexq_jobs_scheduled" in p or "flexq_jobs_leases" in p for p in upkeep), plans
    assert "sqlite_autoindex_flexq_jobs_1 (id=?)" in renew, renew
