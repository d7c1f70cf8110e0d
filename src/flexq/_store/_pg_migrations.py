"""The PostgreSQL schema, as numbered migrations that the store applies when it opens (unless
made with ``migrate=False``) and that ``flexq migrate`` applies.

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

from flexq._states import FINAL_STATES, RUNNING_STATES
from flexq._store.base import ACTIVE_BATCH_STATES, Migration

_FINAL = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
_RUNNING = ",".join(f"'{s}'" for s in sorted(RUNNING_STATES))
_ACTIVE = ",".join(f"'{s}'" for s in sorted(ACTIVE_BATCH_STATES))


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
    Migration(
        2,
        "batch jobs (holding queues, slots, chunks), schedules and dependencies",
        f"""
ALTER TABLE {{schema}}.flexq_jobs ADD COLUMN position double precision;
CREATE INDEX flexq_jobs_holding ON {{schema}}.flexq_jobs (tenant, position)
    WHERE state = 'HOLDING';
CREATE INDEX flexq_jobs_active_batches ON {{schema}}.flexq_jobs (tenant)
    WHERE kind = 'batch' AND state IN ({_ACTIVE});
CREATE TABLE {{schema}}.flexq_batches (
    job_id text PRIMARY KEY,
    prepared boolean NOT NULL DEFAULT false,
    total_items bigint NOT NULL DEFAULT 0,
    chunks_total bigint NOT NULL DEFAULT 0,
    items_processed bigint NOT NULL DEFAULT 0,
    chunks_succeeded bigint NOT NULL DEFAULT 0,
    chunks_failed bigint NOT NULL DEFAULT 0
);
CREATE TABLE {{schema}}.flexq_chunks (
    job_id text NOT NULL,
    idx integer NOT NULL,
    size integer NOT NULL,
    items text NOT NULL,
    status smallint NOT NULL DEFAULT 0,
    error text,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE {{schema}}.flexq_schedules (
    name text PRIMARY KEY,
    tenant text NOT NULL,
    cron text NOT NULL,
    timezone text NOT NULL,
    task text NOT NULL,
    args text NOT NULL,
    kwargs text NOT NULL,
    misfire text NOT NULL,
    reserve boolean NOT NULL,
    state text NOT NULL,
    next_fire_time double precision,
    previous_fire_time double precision,
    times_triggered bigint NOT NULL DEFAULT 0,
    last_job_id text,
    revision bigint NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX flexq_schedules_due ON {{schema}}.flexq_schedules (next_fire_time)
    WHERE state = 'active';
CREATE INDEX flexq_schedules_tenant ON {{schema}}.flexq_schedules (tenant, name);
CREATE TABLE {{schema}}.flexq_dependencies (
    parent_id text NOT NULL,
    child_id text NOT NULL,
    on_parent_failure text NOT NULL,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX flexq_dependencies_child ON {{schema}}.flexq_dependencies (child_id)
""",
    ),
    Migration(
        3,
        "callouts counted per job, and the registry of worker processes",
        """
ALTER TABLE {schema}.flexq_jobs ADD COLUMN callouts integer NOT NULL DEFAULT 0;
CREATE TABLE {schema}.flexq_workers (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    workers integer NOT NULL,
    lease double precision NOT NULL,
    started_at double precision NOT NULL,
    last_seen double precision NOT NULL
)
""",
    ),
    Migration(
        4,
        "jobs marked when others depend on them, so most reports are one statement",
        """
ALTER TABLE {schema}.flexq_jobs ADD COLUMN has_dependants boolean NOT NULL DEFAULT false;
CREATE FUNCTION {schema}.flexq_mark_parents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.flexq_jobs SET has_dependants = true
    WHERE id IN (SELECT parent_id FROM added) AND NOT has_dependants;
    RETURN NULL;
END $$;
CREATE TRIGGER flexq_mark_parents AFTER INSERT ON {schema}.flexq_dependencies
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.flexq_mark_parents();
UPDATE {schema}.flexq_jobs SET has_dependants = true
WHERE id IN (SELECT parent_id FROM {schema}.flexq_dependencies)
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

KEY_CONFLICT = f"(tenant, key) WHERE key IS NOT NULL AND state NOT IN ({_FINAL})"
"""The ON CONFLICT target that matches the unique index ``flexq_jobs_key``."""


def statements(migration: Migration, schema: str) -> list[str]:
    """The migration's statements for ``schema`` (an identifier already checked): its SQL cut
    at each semicolon outside ``$$``-quoted function bodies."""
    found: list[str] = []
    current = ""
    for index, part in enumerate(migration.sql.replace("{schema}", schema).split("$$")):
        if index % 2:  # a function body
            current += f"$${part}$$"
            continue
        first, *rest = part.split(";")
        current += first
        for piece in rest:
            found.append(current)
            current = piece
    found.append(current)
    return [statement.strip() for statement in found if statement.strip()]
