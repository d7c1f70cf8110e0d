"""The PostgreSQL schema, as numbered migrations that the store applies when it opens.

Each migration is applied once, in order, in one transaction, and recorded in
``flexq_migrations``. Never edit a migration that has shipped: add the next one. The SQL names
its objects ``{schema}.flexq_...``; ``{schema}`` is replaced by the store's (validated) schema.

Every claim and every outcome writes a new version of the job's row, and with it an entry in
every index (a state change is never a HOT update), so the table has only the indexes that
the dispatcher, upkeep and the common queries need. Running jobs are few (at most the workers
of all processes): renewal and recovery share one index of them. Listing jobs by state has an
index only for the rare final states (FAILED, ABORTED); the others are common, or have a
partial index of their own.
"""

from __future__ import annotations

from typing import NamedTuple

from flexq._states import FINAL_STATES, RUNNING_STATES

_FINAL = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
_RUNNING = ",".join(f"'{s}'" for s in sorted(RUNNING_STATES))


class Migration(NamedTuple):
    """One step of the schema: its number, what it does, and its SQL statements."""

    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, pauses, and the partial indexes that choose work",
        f"""
CREATE TABLE {{schema}}.flexq_jobs (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    task text NOT NULL,
    kind text NOT NULL,
    kind_rank integer NOT NULL,
    tenant text NOT NULL,
    priority integer NOT NULL,
    state text NOT NULL,
    args text NOT NULL,
    kwargs text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    timeout double precision,
    created_at double precision NOT NULL,
    run_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    result text,
    errors text,
    progress text,
    parent_id text,
    key text,
    lease_owner text,
    lease_until double precision,
    lease_expiries integer NOT NULL DEFAULT 0,
    abort_requested boolean NOT NULL DEFAULT false
);
CREATE INDEX flexq_jobs_ready ON {{schema}}.flexq_jobs (tenant, task, priority DESC, kind_rank, seq)
    WHERE state = 'QUEUED' AND lease_expiries = 0;
CREATE INDEX flexq_jobs_suspects ON {{schema}}.flexq_jobs (seq)
    WHERE state = 'QUEUED' AND lease_expiries > 0;
CREATE INDEX flexq_jobs_scheduled ON {{schema}}.flexq_jobs (run_at) WHERE state = 'SCHEDULED';
CREATE INDEX flexq_jobs_leases ON {{schema}}.flexq_jobs (lease_until) WHERE state IN ({_RUNNING});
CREATE INDEX flexq_jobs_finished ON {{schema}}.flexq_jobs (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX flexq_jobs_key ON {{schema}}.flexq_jobs (tenant, key)
    WHERE key IS NOT NULL AND state NOT IN ({_FINAL});
CREATE INDEX flexq_jobs_tenant ON {{schema}}.flexq_jobs (tenant, seq);
CREATE INDEX flexq_jobs_failed ON {{schema}}.flexq_jobs (state, seq)
    WHERE state IN ('FAILED', 'ABORTED');
CREATE INDEX flexq_jobs_parent ON {{schema}}.flexq_jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE {{schema}}.flexq_pauses (
    scope text NOT NULL,
    name text NOT NULL,
    since double precision NOT NULL,
    PRIMARY KEY (scope, name)
)
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

KEY_CONFLICT = f"(tenant, key) WHERE key IS NOT NULL AND state NOT IN ({_FINAL})"
"""The ON CONFLICT target that matches the unique index ``flexq_jobs_key``."""


def statements(migration: Migration, schema: str) -> list[str]:
    """The migration's statements for ``schema`` (an identifier already checked)."""
    sql = migration.sql.replace("{schema}", schema)
    return [part.strip() for part in sql.split(";") if part.strip()]
