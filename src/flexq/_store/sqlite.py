"""The SQLite store: one file, shared safely by several processes (WAL, BEGIN IMMEDIATE).

The sqlite3 connection lives on a thread of its own (:class:`DatabaseThread`), so the same code
serves asyncio and trio, each call is one round trip to that thread, and a whole transaction
(many statements) runs in that one round trip. Cancelling a caller waits for its transaction to
end: a transaction is never left half done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

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
from flexq._store._thread import DatabaseThread
from flexq._store.base import (
    ACTIVE_BATCH_STATES,
    HOLDING_STEP,
    BatchCounts,
    ChunkDone,
    ClaimedJob,
    DependentJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    Migration,
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
    from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

T = TypeVar("T")

SCHEMA_VERSION = 3

_FINAL = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
_RUNNING = ",".join(f"'{s}'" for s in sorted(RUNNING_STATES))
_ACTIVE = ",".join(f"'{s}'" for s in sorted(ACTIVE_BATCH_STATES))

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS flexq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flexq_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    kind_rank INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    args TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    timeout REAL,
    created_at REAL NOT NULL,
    run_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    errors TEXT,
    progress TEXT,
    parent_id TEXT,
    key TEXT,
    lease_owner TEXT,
    lease_until REAL,
    lease_expiries INTEGER NOT NULL DEFAULT 0,
    abort_requested INTEGER NOT NULL DEFAULT 0,
    position REAL,
    callouts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS flexq_jobs_ready
    ON flexq_jobs (tenant, task, priority DESC, kind_rank, seq)
    WHERE state = 'QUEUED' AND lease_expiries = 0;
CREATE INDEX IF NOT EXISTS flexq_jobs_ready_tasks
    ON flexq_jobs (task, tenant) WHERE state = 'QUEUED' AND lease_expiries = 0;
CREATE INDEX IF NOT EXISTS flexq_jobs_suspects
    ON flexq_jobs (seq) WHERE state = 'QUEUED' AND lease_expiries > 0;
CREATE INDEX IF NOT EXISTS flexq_jobs_scheduled
    ON flexq_jobs (run_at) WHERE state = 'SCHEDULED';
CREATE INDEX IF NOT EXISTS flexq_jobs_leases
    ON flexq_jobs (lease_until) WHERE state IN ({_RUNNING});
CREATE INDEX IF NOT EXISTS flexq_jobs_finished
    ON flexq_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS flexq_jobs_key
    ON flexq_jobs (tenant, key) WHERE key IS NOT NULL AND state NOT IN ({_FINAL});
CREATE INDEX IF NOT EXISTS flexq_jobs_tenant ON flexq_jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS flexq_jobs_state ON flexq_jobs (state, seq);
CREATE INDEX IF NOT EXISTS flexq_jobs_parent ON flexq_jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS flexq_pauses (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (scope, name)
);
CREATE TABLE IF NOT EXISTS flexq_workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    workers INTEGER NOT NULL,
    lease REAL NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flexq_batches (
    job_id TEXT PRIMARY KEY,
    prepared INTEGER NOT NULL DEFAULT 0,
    total_items INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    items_processed INTEGER NOT NULL DEFAULT 0,
    chunks_succeeded INTEGER NOT NULL DEFAULT 0,
    chunks_failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS flexq_chunks (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    items TEXT NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS flexq_schedules (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    cron TEXT NOT NULL,
    timezone TEXT NOT NULL,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    misfire TEXT NOT NULL,
    reserve INTEGER NOT NULL,
    state TEXT NOT NULL,
    next_fire_time REAL,
    previous_fire_time REAL,
    times_triggered INTEGER NOT NULL DEFAULT 0,
    last_job_id TEXT,
    revision INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS flexq_schedules_due
    ON flexq_schedules (next_fire_time) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS flexq_schedules_tenant ON flexq_schedules (tenant, name);
CREATE TABLE IF NOT EXISTS flexq_dependencies (
    parent_id TEXT NOT NULL,
    child_id TEXT NOT NULL,
    on_parent_failure TEXT NOT NULL,
    PRIMARY KEY (parent_id, child_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flexq_dependencies_child ON flexq_dependencies (child_id);
"""

_MIGRATIONS = (
    Migration(
        2,
        "batch jobs (holding queues, slots, chunks), schedules and dependencies",
        "ALTER TABLE flexq_jobs ADD COLUMN position REAL",
    ),
    Migration(
        3,
        "callouts counted per job, and the registry of worker processes",
        "ALTER TABLE flexq_jobs ADD COLUMN callouts INTEGER NOT NULL DEFAULT 0",
    ),
)
"""What an older file lacks beyond the tables and indexes of ``_SCHEMA`` (which creates
every missing one, at any version)."""

_INDEXES_V2 = f"""
CREATE INDEX IF NOT EXISTS flexq_jobs_holding
    ON flexq_jobs (tenant, position) WHERE state = 'HOLDING';
CREATE INDEX IF NOT EXISTS flexq_jobs_active_batches
    ON flexq_jobs (tenant) WHERE kind = 'batch' AND state IN ({_ACTIVE});
"""

CHUNK_PENDING, CHUNK_SUCCEEDED, CHUNK_FAILED = 0, 1, 2

_INFO_COLUMNS = (
    "seq, id, task, kind, tenant, priority, state, args, kwargs, attempts, max_attempts, "
    "created_at, run_at, started_at, finished_at, result, errors, parent_id, key, progress, "
    "abort_requested, prepared, total_items, chunks_total, items_processed, chunks_succeeded, "
    "chunks_failed, callouts"
)
_INFO_FROM = "flexq_jobs LEFT JOIN flexq_batches ON flexq_batches.job_id = flexq_jobs.id"
_COUNTS = "prepared, total_items, chunks_total, items_processed, chunks_succeeded, chunks_failed"

_INSERT = (
    "INSERT INTO flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,"
    " max_attempts, timeout, created_at, run_at, parent_id, key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ROWS_PER_INSERT = 500
_INSERT_MANY = _INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (_ROWS_PER_INSERT - 1)


def _version(db: sqlite3.Connection) -> int:
    """The file's schema version: 0 if it has no flexq schema."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'flexq_meta'").fetchone():
        return 0
    row = db.execute("SELECT value FROM flexq_meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _insert_all(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert rows with statements of 500 rows: one step (and one hand-over of the GIL, which
    the event loop's thread contends for) per 500 rows rather than per row."""
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    for start in range(0, whole, _ROWS_PER_INSERT):
        db.execute(_INSERT_MANY, [v for row in rows[start : start + _ROWS_PER_INSERT] for v in row])
    if whole < len(rows):
        rest = rows[whole:]
        tail = _INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (len(rest) - 1)
        db.execute(tail, [v for row in rest for v in row])


_CLAIMED_STATE = "CASE kind WHEN 'batch' THEN 'PREPARING' ELSE 'PROCESSING' END"

_CLAIM = f"""
UPDATE flexq_jobs
SET state = {_CLAIMED_STATE}, attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq IN (
    SELECT seq FROM ({{best_of_each_task}})
    ORDER BY priority DESC, kind_rank, seq
    LIMIT ?5
)
RETURNING id, task, kind, tenant, priority, args, kwargs, attempts, max_attempts, timeout,
    parent_id, kind_rank, seq
"""

_BEST_OF_TASK = """
SELECT * FROM (
    SELECT seq, priority, kind_rank FROM flexq_jobs INDEXED BY flexq_jobs_ready
    WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = ?4 AND task = ?{task}
    ORDER BY priority DESC, kind_rank, seq
    LIMIT ?5
)"""


_CLAIM_CHOSEN = f"""
UPDATE flexq_jobs
SET state = {_CLAIMED_STATE}, attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq IN ({{chosen}}) AND state = 'QUEUED'
RETURNING id, task, kind, tenant, priority, args, kwargs, attempts, max_attempts, timeout,
    parent_id, kind_rank, seq
"""

MAX_TASKS_PER_STATEMENT = 400
"""SQLite allows 500 terms in a compound SELECT; more runnable tasks are claimed in rounds."""


def best_of_each_task(task_count: int) -> str:
    """A SELECT of the best ``?5`` jobs of tenant ``?4`` of each task ``?6``, ``?7``, ..."""
    return " UNION ALL ".join(_BEST_OF_TASK.format(task=6 + i) for i in range(task_count))


def claim_sql(task_count: int) -> str:
    """The claim statement for ``task_count`` runnable tasks (parameters ?6, ?7, ...).

    The best ``n`` jobs of a tenant are the best ``n`` among the best ``n`` of each task, each
    read straight off the index: jobs of tasks this process does not run (or paused tasks)
    are never scanned past.
    """
    return _CLAIM.format(best_of_each_task=best_of_each_task(task_count))


_PAUSED_TENANTS = "SELECT name FROM flexq_pauses WHERE scope = 'tenant'"

_SUSPECT = """
SELECT seq FROM flexq_jobs INDEXED BY flexq_jobs_suspects
WHERE state = 'QUEUED' AND lease_expiries > 0 AND task IN ({marks})
    AND tenant NOT IN ({paused_tenants})
ORDER BY seq
LIMIT 1
"""

_CLAIM_SUSPECT = f"""
UPDATE flexq_jobs
SET state = {_CLAIMED_STATE}, attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq = ({{suspect}})
RETURNING id, task, kind, tenant, priority, args, kwargs, attempts, max_attempts, timeout,
    parent_id, kind_rank, seq
"""

_READY_TENANTS = """
WITH RECURSIVE ready(tenant) AS (
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_ready_tasks
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND task = ?1
            ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_ready_tasks
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND task = ?1 AND tenant > ready.tenant
            ORDER BY tenant LIMIT 1)
    FROM ready WHERE ready.tenant IS NOT NULL
)
SELECT tenant FROM ready WHERE tenant IS NOT NULL
"""

_GUARD = f"WHERE id = ? AND lease_owner = ? AND state IN ({_RUNNING})"
_APPEND_ERROR = "errors = json_insert(COALESCE(errors, '[]'), '$[#]', json(?))"
_RELEASE_LEASE = "lease_owner = NULL, lease_until = NULL"


class SQLiteStore:
    """Jobs in one SQLite file (or ``:memory:``).

    With ``migrate=False``, opening only checks that the file has this flexq's schema version
    (and creates no file).
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        migrate: bool = True,
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise InvalidArguments(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.migrates_on_open = migrate
        self._conn: sqlite3.Connection | None = None
        self._thread = DatabaseThread(f"flexq-sqlite:{path}")
        self._limits = LimitTable()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._thread.running:
            raise FlexqError("the SQLite store is not open")
        try:
            return await self._thread.run(fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FlexqError("the SQLite store is not open")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._thread.start()
        try:
            self._conn = await self._run(self._connect)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._thread.stop()
            raise

    async def schema_status(self) -> SchemaStatus:
        return await self._alone(self._status)

    async def migrate(self) -> SchemaStatus:
        def migrate() -> SchemaStatus:
            db = self._open_file()
            try:
                return self._migrate(db)
            finally:
                db.close()

        return await self._alone(migrate)

    async def _alone(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a worker thread, whether the store is open or not."""
        try:
            return await anyio.to_thread.run_sync(fn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc

    def _status(self) -> SchemaStatus:
        """The file's schema version, without creating the file."""
        if self.path == ":memory:" or not os.path.exists(self.path):
            return SchemaStatus(self.path, 0, SCHEMA_VERSION)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            return SchemaStatus(self.path, _version(db), SCHEMA_VERSION)
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        if not self.migrates_on_open:
            status = self._status()
            if status.version != SCHEMA_VERSION:
                raise SchemaVersionError(status.where, status.version, SCHEMA_VERSION)
        db = self._open_file()
        try:
            if self.migrates_on_open:
                self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _open_file(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> SchemaStatus:
        """Create what the file lacks, in one transaction: a new file gets the whole schema at
        once, an older one the migrations after its version."""
        db.execute("BEGIN IMMEDIATE")
        try:
            status = SchemaStatus(self.path, _version(db), SCHEMA_VERSION)
            if status.version > SCHEMA_VERSION:
                raise SchemaVersionError(status.where, status.version, SCHEMA_VERSION)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            applied: list[tuple[int, str]] = []
            for migration in _MIGRATIONS:
                if 0 < status.version < migration.version:
                    db.execute(migration.sql)
                    applied.append((migration.version, migration.description))
            for statement in _INDEXES_V2.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO flexq_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return dataclasses.replace(status, applied=tuple(applied))

    async def close(self) -> None:
        if self._conn is None:
            return
        await self._run(self._conn.close)
        self._conn = None
        await self._thread.stop()

    # -- enqueue ----------------------------------------------------------------------------

    async def enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        return await self._run(self._enqueue, units, now)

    def _enqueue(self, units: Sequence[EnqueueUnit], now: float) -> list[EnqueueResult]:
        results: list[EnqueueResult] = []
        with self._transaction() as db:
            unkeyed: list[tuple[Any, ...]] = []
            for unit in units:
                plain = all(job.key is None and job.kind is not Kind.BATCH for job in unit.jobs)
                if plain:
                    unkeyed.extend(_insert_row(job, now) for job in unit.jobs)
                    results.append([job.id for job in unit.jobs])
                    continue
                _insert_all(db, unkeyed)  # keep creation order: earlier units first
                unkeyed.clear()
                db.execute("SAVEPOINT flexq_unit")
                try:
                    results.append(self._insert_keyed(db, unit, now))
                except (DuplicateJob, LimitExceeded) as refused:
                    db.execute("ROLLBACK TO flexq_unit")
                    results.append(refused)
                db.execute("RELEASE flexq_unit")
            _insert_all(db, unkeyed)
        return results

    def _insert_keyed(self, db: sqlite3.Connection, unit: EnqueueUnit, now: float) -> list[JobId]:
        """Insert a unit with keys or batch jobs, row by row; raise to refuse it."""
        batches: set[str] = set()
        ids: list[JobId] = []
        for job in unit.jobs:
            if job.key is not None:
                row = db.execute(
                    f"SELECT id FROM flexq_jobs WHERE tenant = ? AND key = ?"
                    f" AND state NOT IN ({_FINAL})",
                    (job.tenant, job.key),
                ).fetchone()
                if row is not None:
                    if unit.on_duplicate == "raise":
                        raise DuplicateJob(job.tenant, job.key, row[0])
                    ids.append(row[0])
                    continue
            db.execute(_INSERT, _insert_row(job, now))
            if job.kind is Kind.BATCH:
                _hold(db, job.id, job.tenant)
                db.execute("INSERT INTO flexq_batches (job_id) VALUES (?)", (job.id,))
                batches.add(job.tenant)
            ids.append(job.id)
        # Checked once the new jobs are in: a duplicate (its holder's id) takes no room.
        self._check_holding_room(db, batches)
        for tenant in sorted(batches):
            self._admit(db, tenant)
        return ids

    def _check_holding_room(self, db: sqlite3.Connection, tenants: Collection[str]) -> None:
        """Raise LimitExceeded unless the tenants' holding queues, with the batch jobs just put
        in them, fit their limits once the free active slots took what they can."""
        for tenant in tenants:
            limits = self._limits(tenant)
            holding, active = _usage(db, tenant)
            free = max(0, limits.max_active_batches - active)
            if holding - min(free, holding) > limits.max_holding:
                raise holding_full(tenant, limits.max_holding)

    # -- dispatching ------------------------------------------------------------------------

    async def ready_tenants(self, tasks: Collection[str]) -> list[str]:
        return await self._run(self._ready_tenants, sorted(tasks))

    def _ready_tenants(self, tasks: list[str]) -> list[str]:
        tenants: set[str] = set()
        for task in tasks:
            tenants.update(row[0] for row in self._db.execute(_READY_TENANTS, (task,)))
        return sorted(tenants)

    async def claim(
        self,
        owner: str,
        wanted: Mapping[str, int],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        return await self._run(self._claim, owner, dict(wanted), set(tasks), now, lease_until)

    def _claim(
        self, owner: str, wanted: dict[str, int], tasks: set[str], now: float, lease_until: float
    ) -> list[ClaimedJob]:
        claimed: list[ClaimedJob] = []
        with self._transaction() as db:
            runnable = self._runnable(db, tasks)
            if not runnable:
                return claimed
            paused_tenants = {
                name for (name,) in db.execute(
                    "SELECT name FROM flexq_pauses WHERE scope = 'tenant'"
                )
            }  # fmt: skip
            sql = claim_sql(len(runnable)) if len(runnable) <= MAX_TASKS_PER_STATEMENT else ""
            for tenant, count in wanted.items():
                if count <= 0 or tenant in paused_tenants:
                    continue
                rows: Iterable[tuple[Any, ...]]
                if sql:
                    rows = db.execute(sql, (now, owner, lease_until, tenant, count, *runnable))
                else:
                    rows = self._claim_in_rounds(db, owner, tenant, count, runnable, now,
                                                 lease_until)  # fmt: skip
                claimed.extend(sorted(map(_claimed, rows), key=_by_order))
        return claimed

    @staticmethod
    def _claim_in_rounds(
        db: sqlite3.Connection,
        owner: str,
        tenant: str,
        count: int,
        runnable: list[str],
        now: float,
        lease_until: float,
    ) -> list[tuple[Any, ...]]:
        """Claim for very many runnable tasks: choose among each round's best, then update."""
        best: list[tuple[int, int, int]] = []
        for start in range(0, len(runnable), MAX_TASKS_PER_STATEMENT):
            tasks = runnable[start : start + MAX_TASKS_PER_STATEMENT]
            rows = db.execute(best_of_each_task(len(tasks)), (None,) * 3 + (tenant, count, *tasks))
            best.extend((-priority, rank, seq) for seq, priority, rank in rows)
        chosen = [seq for _, _, seq in sorted(best)[:count]]
        if not chosen:
            return []
        sql = _CLAIM_CHOSEN.format(chosen=", ".join(str(seq) for seq in chosen))
        return db.execute(sql, (now, owner, lease_until)).fetchall()

    async def has_suspects(self, tasks: Collection[str]) -> bool:
        return await self._run(self._has_suspects, set(tasks))

    def _has_suspects(self, tasks: set[str]) -> bool:
        runnable = self._runnable(self._db, tasks)
        if not runnable:
            return False
        row = self._db.execute(
            _SUSPECT.format(
                marks=", ".join(f"?{1 + i}" for i in range(len(runnable))),
                paused_tenants=_PAUSED_TENANTS,
            ),
            runnable,
        ).fetchone()
        return row is not None

    async def claim_suspect(
        self, owner: str, tasks: Collection[str], now: float, lease_until: float
    ) -> ClaimedJob | None:
        return await self._run(self._claim_suspect, owner, set(tasks), now, lease_until)

    def _claim_suspect(
        self, owner: str, tasks: set[str], now: float, lease_until: float
    ) -> ClaimedJob | None:
        with self._transaction() as db:
            runnable = self._runnable(db, tasks)
            if not runnable:
                return None
            suspect = _SUSPECT.format(
                marks=", ".join(f"?{4 + i}" for i in range(len(runnable))),
                paused_tenants=_PAUSED_TENANTS,
            )
            row = db.execute(
                _CLAIM_SUSPECT.format(suspect=suspect), (now, owner, lease_until, *runnable)
            ).fetchone()
        return None if row is None else _claimed(row)

    @staticmethod
    def _runnable(db: sqlite3.Connection, tasks: set[str]) -> list[str]:
        """The tasks that may be claimed now: none if the queue is paused."""
        paused: dict[PauseScope, set[str]] = {scope: set() for scope in PauseScope}
        for scope, name in db.execute("SELECT scope, name FROM flexq_pauses"):
            paused[PauseScope(scope)].add(name)
        if paused[PauseScope.QUEUE]:
            return []
        return sorted(tasks - paused[PauseScope.TASK])

    async def report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[JobId]:
        return await self._run(self._report, owner, checked_outcomes(outcomes), now)

    def _report(self, owner: str, outcomes: Sequence[Outcome], now: float) -> list[JobId]:
        by_update: dict[str, list[tuple[Any, ...]]] = {}
        for outcome in outcomes:
            update, params = _outcome_update(outcome, now)
            if outcome.callouts:
                update = update.replace(" SET ", " SET callouts = callouts + ?, ", 1)
                params = (outcome.callouts, *params)
            by_update.setdefault(update, []).append((outcome.job_id, *params))
        written: list[JobId] = []
        freed: set[str] = set()
        with self._transaction() as db:
            for update, rows in by_update.items():
                for start in range(0, len(rows), _ROWS_PER_INSERT):
                    chunk = rows[start : start + _ROWS_PER_INSERT]
                    statement = _update_from_values(update, len(chunk))
                    values = [v for row in chunk for v in row]
                    for job_id, tenant, kind, state in db.execute(statement, [*values, owner]):
                        written.append(job_id)
                        if kind == Kind.BATCH and state in FINAL_STATES:
                            freed.add(tenant)
            if written and _has_dependencies(db):
                freed |= _release_dependants(db, _final_states(db, written), now)
            for tenant in sorted(freed):
                self._admit(db, tenant)
        return written

    async def renew(self, owner: str, job_ids: Collection[JobId], lease_until: float) -> Renewal:
        return await self._run(self._renew, owner, list(job_ids), lease_until)

    def _renew(self, owner: str, job_ids: list[JobId], lease_until: float) -> Renewal:
        renewal = Renewal(aborted=[], lost=[])
        with self._transaction() as db:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                renewed = dict(
                    db.execute(
                        f"UPDATE flexq_jobs SET lease_until = ? WHERE state IN ({_RUNNING})"
                        f" AND lease_owner = ? AND id IN ({','.join('?' * len(chunk))})"
                        " RETURNING id, abort_requested",
                        (lease_until, owner, *chunk),
                    ).fetchall()
                )
                renewal.aborted.extend(job_id for job_id, abort in renewed.items() if abort)
                renewal.lost.extend(job_id for job_id in chunk if job_id not in renewed)
        return renewal

    async def recover(self, now: float, max_lease_expiries: int) -> Recovered:
        return await self._run(self._recover, now, max_lease_expiries)

    def _recover(self, now: float, max_lease_expiries: int) -> Recovered:
        recovered = Recovered(requeued=[], failed=[], aborted=[])
        with self._transaction() as db:
            expired = db.execute(
                "SELECT id, attempts, lease_expiries, abort_requested, kind, tenant"
                " FROM flexq_jobs INDEXED BY flexq_jobs_leases"
                f" WHERE state IN ({_RUNNING}) AND lease_until < ?",
                (now,),
            ).fetchall()
            freed: set[str] = set()
            for job_id, attempts, expiries, abort_requested, kind, tenant in expired:
                error = dumps(lease_error(attempts, expiries + 1, max_lease_expiries, now), "error")
                if abort_requested:
                    target, bucket = State.ABORTED, recovered.aborted
                elif expiries + 1 >= max_lease_expiries:
                    target, bucket = State.FAILED, recovered.failed
                else:
                    target, bucket = State.QUEUED, recovered.requeued
                finished = now if target.is_final else None
                db.execute(
                    f"UPDATE flexq_jobs SET state = ?, {_APPEND_ERROR}, {_RELEASE_LEASE},"
                    " lease_expiries = lease_expiries + 1, finished_at = ? WHERE id = ?",
                    (target, error, finished, job_id),
                )
                bucket.append(job_id)
                if kind == Kind.BATCH and target.is_final:
                    freed.add(tenant)
            if (recovered.failed or recovered.aborted) and _has_dependencies(db):
                ended = [(job_id, State.FAILED) for job_id in recovered.failed]
                ended += [(job_id, State.ABORTED) for job_id in recovered.aborted]
                freed |= _release_dependants(db, ended, now)
            for tenant in sorted(freed):
                self._admit(db, tenant)
        return recovered

    async def promote(self, now: float) -> tuple[list[str], float | None]:
        return await self._run(self._promote, now)

    def _promote(self, now: float) -> tuple[list[str], float | None]:
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE flexq_jobs SET state = 'QUEUED' WHERE seq IN ("
                " SELECT seq FROM flexq_jobs INDEXED BY flexq_jobs_scheduled"
                " WHERE state = 'SCHEDULED' AND run_at <= ?"
                " ORDER BY run_at LIMIT 5000) RETURNING tenant",
                (now,),
            ).fetchall()
            (next_run_at,) = db.execute(
                "SELECT MIN(run_at) FROM flexq_jobs INDEXED BY flexq_jobs_scheduled"
                " WHERE state = 'SCHEDULED'"
            ).fetchone()
        return sorted({row[0] for row in rows}), next_run_at

    # -- control ----------------------------------------------------------------------------

    async def request_abort(self, job_id: JobId, now: float) -> State:
        return await self._run(self._request_abort, job_id, now)

    def _request_abort(self, job_id: JobId, now: float) -> State:
        with self._transaction() as db:
            row = db.execute(
                "SELECT state, kind, tenant FROM flexq_jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            state = State(row[0])
            if state in RUNNING_STATES:
                db.execute("UPDATE flexq_jobs SET abort_requested = 1 WHERE id = ?", (job_id,))
                return state
            check_transition(state, State.ABORTED, job_id)
            db.execute(
                "UPDATE flexq_jobs SET state = 'ABORTED', abort_requested = 1, finished_at = ?,"
                " position = NULL WHERE id = ?",
                (now, job_id),
            )
            if _has_dependencies(db):
                db.execute("DELETE FROM flexq_dependencies WHERE child_id = ?", (job_id,))
                for tenant in _release_dependants(db, [(job_id, State.ABORTED)], now):
                    self._admit(db, tenant)
            if row[1] == Kind.BATCH and state in ACTIVE_BATCH_STATES:
                self._admit(db, row[2])
        return State.ABORTED

    async def set_progress(self, owner: str, job_id: JobId, progress: str) -> bool:
        return await self._run(self._set_progress, owner, job_id, progress)

    def _set_progress(self, owner: str, job_id: JobId, progress: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE flexq_jobs SET progress = ? " + _GUARD, (progress, job_id, owner)
            )
            return cursor.rowcount > 0

    async def set_pause(self, scope: PauseScope, name: str, paused: bool, now: float) -> bool:
        return await self._run(self._set_pause, scope, name, paused, now)

    def _set_pause(self, scope: PauseScope, name: str, paused: bool, now: float) -> bool:
        with self._transaction() as db:
            if paused:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO flexq_pauses (scope, name, since) VALUES (?, ?, ?)",
                    (scope, name, now),
                )
            else:
                cursor = db.execute(
                    "DELETE FROM flexq_pauses WHERE scope = ? AND name = ?", (scope, name)
                )
            return cursor.rowcount > 0

    async def pauses(self) -> list[Pause]:
        rows = await self._run(
            self._select,
            "SELECT scope, name, since FROM flexq_pauses ORDER BY since, scope, name",
            (),
        )
        return [
            Pause(PauseScope(scope), name, timestamp_to_datetime(since))
            for scope, name, since in rows
        ]

    async def prune(self, finished_before: float, limit: int) -> int:
        return await self._run(self._prune, finished_before, limit)

    def _prune(self, finished_before: float, limit: int) -> int:
        with self._transaction() as db:
            doomed = db.execute(
                "SELECT seq, id, kind FROM flexq_jobs INDEXED BY flexq_jobs_finished"
                f" WHERE finished_at < ? AND state IN ({_FINAL}) ORDER BY finished_at, seq"
                " LIMIT ?",
                (finished_before, limit),
            ).fetchall()
            db.executemany("DELETE FROM flexq_jobs WHERE seq = ?", [(seq,) for seq, _, _ in doomed])
            batches = [(job_id,) for _, job_id, kind in doomed if kind == Kind.BATCH]
            db.executemany("DELETE FROM flexq_chunks WHERE job_id = ?", batches)
            db.executemany("DELETE FROM flexq_batches WHERE job_id = ?", batches)
            return len(doomed)

    async def listen(
        self,
        wake: Callable[[list[str] | None, float | None], None],
        free_workers: Callable[[], int],
    ) -> None:
        await anyio.sleep_forever()

    # -- queries ----------------------------------------------------------------------------

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    async def get(self, job_id: JobId) -> JobInfo:
        rows = await self._run(
            self._select, f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id = ?", (job_id,)
        )
        if not rows:
            raise JobNotFound(job_id)
        return _info(rows[0])

    async def get_many(self, job_ids: Sequence[JobId]) -> list[JobInfo]:
        infos: list[JobInfo] = []
        for start in range(0, len(job_ids), 500):
            chunk = list(job_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._run(
                self._select,
                f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id IN ({marks})",
                chunk,
            )
            infos.extend(_info(row) for row in rows)
        return infos

    async def jobs(
        self, where: JobFilter, *, after_seq: int | None, offset: int, limit: int
    ) -> list[tuple[int, JobInfo]]:
        clause, params = _where(where)
        if after_seq is not None:
            clause += " AND seq > ?"
            params.append(after_seq)
        rows = await self._run(
            self._select,
            f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE {clause}"
            " ORDER BY seq LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [(row[0], _info(row)) for row in rows]

    async def counts(self, where: JobFilter) -> dict[State, int]:
        clause, params = _where(where)
        rows = await self._run(
            self._select,
            f"SELECT state, COUNT(*) FROM flexq_jobs WHERE {clause} GROUP BY state",
            params,
        )
        return {State(state): count for state, count in rows}

    # -- batch jobs, the holding queue and active slots -------------------------------------

    def set_limits(self, limits: LimitTable) -> None:
        self._limits = limits

    def _admit(self, db: sqlite3.Connection, tenant: str) -> bool:
        """Move the tenant's first HOLDING jobs into its free active slots."""
        holding, active = _usage(db, tenant)
        free = self._limits(tenant).max_active_batches - active
        if not holding or free <= 0:
            return False
        db.execute(
            "UPDATE flexq_jobs SET state = 'QUEUED', position = NULL WHERE seq IN ("
            " SELECT seq FROM flexq_jobs INDEXED BY flexq_jobs_holding"
            " WHERE tenant = ? AND state = 'HOLDING' ORDER BY position LIMIT ?)",
            (tenant, free),
        )
        return True

    async def admit(self, now: float) -> list[str]:
        return await self._run(self._admit_all)

    def _admit_all(self) -> list[str]:
        db = self._db
        tenants = [row[0] for row in db.execute(_HOLDING_TENANTS)]
        if not any(_usage(db, t)[1] < self._limits(t).max_active_batches for t in tenants):
            return []  # the usual case: no write lock taken
        with self._transaction() as db:
            tenants = [row[0] for row in db.execute(_HOLDING_TENANTS)]
            return [tenant for tenant in tenants if self._admit(db, tenant)]

    async def holding_order(self, tenant: str) -> list[JobId]:
        rows = await self._run(
            self._select,
            "SELECT id FROM flexq_jobs INDEXED BY flexq_jobs_holding"
            " WHERE tenant = ? AND state = 'HOLDING' ORDER BY position",
            (tenant,),
        )
        return [row[0] for row in rows]

    async def reorder(self, job_id: JobId, placement: Placement) -> bool:
        return await self._run(self._reorder, job_id, placement)

    def _reorder(self, job_id: JobId, placement: Placement) -> bool:
        with self._transaction() as db:
            tenant, position = _holding_row(db, job_id)
            bounds = _bounds(db, tenant, job_id, placement)
            low, high = bounds
            if (low is None or low < position) and (high is None or position < high):
                return False
            new = _between(low, high)
            if new is None:
                _renumber(db, tenant)
                low, high = _bounds(db, tenant, job_id, placement)
                new = _between(low, high)
            db.execute("UPDATE flexq_jobs SET position = ? WHERE id = ?", (new, job_id))
            return True

    async def usage(self, tenant: str) -> tuple[int, int]:
        return await self._run(lambda: _usage(self._db, tenant))

    async def wait_facts(self, job_id: JobId) -> WaitFacts:
        return await self._run(self._wait_facts, job_id)

    def _wait_facts(self, job_id: JobId) -> WaitFacts:
        with self._transaction() as db:
            row = db.execute(f"SELECT {_INFO_COLUMNS} FROM {_INFO_FROM} WHERE id = ?", (job_id,))
            found = row.fetchone()
            if found is None:
                raise JobNotFound(job_id)
            info = _info(found)
            holding, active = _usage(db, info.tenant)
            position = ready_ahead = tenants_ahead = None
            if info.state is State.HOLDING:
                (position,) = db.execute(
                    "SELECT COUNT(*) FROM flexq_jobs INDEXED BY flexq_jobs_holding"
                    " WHERE tenant = ? AND state = 'HOLDING'"
                    " AND position < (SELECT position FROM flexq_jobs WHERE id = ?)",
                    (info.tenant, job_id),
                ).fetchone()
            if info.state is State.QUEUED:
                (ready_ahead,) = db.execute(
                    "SELECT COUNT(*) FROM flexq_jobs INDEXED BY flexq_jobs_ready"
                    " WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant = ?1"
                    " AND (priority > ?2 OR (priority = ?2 AND (kind_rank < ?3"
                    " OR (kind_rank = ?3 AND seq < ?4))))",
                    (info.tenant, info.priority, info.kind.rank, found[0]),
                ).fetchone()
                tenants = {row[0] for row in db.execute(_QUEUED_TENANTS)}
                tenants_ahead = len(tenants - {info.tenant})
            pauses = db.execute(
                "SELECT scope, name, since FROM flexq_pauses ORDER BY since, scope, name"
            ).fetchall()
        return WaitFacts(
            info=info,
            holding_position=position,
            holding=holding,
            active_batches=active,
            ready_ahead=ready_ahead or 0,
            tenants_ahead=tenants_ahead or 0,
            pauses=tuple(
                Pause(PauseScope(scope), name, timestamp_to_datetime(since))
                for scope, name, since in pauses
            ),
        )

    async def begin_batch(self, owner: str, job_id: JobId) -> BatchCounts | None:
        return await self._run(self._begin_batch, owner, job_id)

    def _begin_batch(self, owner: str, job_id: JobId) -> BatchCounts | None:
        with self._transaction() as db:
            if not _holds(db, owner, job_id):
                return None
            row = db.execute(
                f"SELECT {_COUNTS} FROM flexq_batches WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            counts = BatchCounts(bool(row[0]), *row[1:])
            if counts.prepared:
                db.execute(
                    "UPDATE flexq_jobs SET state = 'PROCESSING' WHERE id = ? AND state = ?",
                    (job_id, State.PREPARING),
                )
                return counts
            db.execute("DELETE FROM flexq_chunks WHERE job_id = ?", (job_id,))
        return NO_COUNTS

    async def add_chunks(
        self, owner: str, job_id: JobId, first: int, chunks: Sequence[tuple[int, str]]
    ) -> bool:
        return await self._run(self._add_chunks, owner, job_id, first, chunks)

    def _add_chunks(
        self, owner: str, job_id: JobId, first: int, chunks: Sequence[tuple[int, str]]
    ) -> bool:
        with self._transaction() as db:
            if not _holds(db, owner, job_id):
                return False
            db.executemany(
                "INSERT INTO flexq_chunks (job_id, idx, size, items) VALUES (?, ?, ?, ?)",
                [(job_id, first + n, size, items) for n, (size, items) in enumerate(chunks)],
            )
            return True

    async def end_preparing(
        self, owner: str, job_id: JobId, total_items: int, chunks_total: int
    ) -> bool:
        return await self._run(self._end_preparing, owner, job_id, total_items, chunks_total)

    def _end_preparing(
        self, owner: str, job_id: JobId, total_items: int, chunks_total: int
    ) -> bool:
        with self._transaction() as db:
            if not _holds(db, owner, job_id):
                return False
            db.execute(
                "UPDATE flexq_batches SET prepared = 1, total_items = ?, chunks_total = ?"
                " WHERE job_id = ?",
                (total_items, chunks_total, job_id),
            )
            db.execute("UPDATE flexq_jobs SET state = 'PROCESSING' WHERE id = ?", (job_id,))
            return True

    async def pending_chunks(self, job_id: JobId, after: int, limit: int) -> list[tuple[int, str]]:
        return await self._run(
            self._select,
            "SELECT idx, items FROM flexq_chunks WHERE job_id = ? AND idx > ? AND status = 0"
            " ORDER BY idx LIMIT ?",
            (job_id, after, limit),
        )

    async def checkpoint(self, owner: str, job_id: JobId, done: Sequence[ChunkDone]) -> bool:
        return await self._run(self._checkpoint, owner, job_id, done)

    def _checkpoint(self, owner: str, job_id: JobId, done: Sequence[ChunkDone]) -> bool:
        with self._transaction() as db:
            if not _holds(db, owner, job_id):
                return False
            items = succeeded = failed = 0
            for chunk in done:
                status = CHUNK_SUCCEEDED if chunk.error is None else CHUNK_FAILED
                cursor = db.execute(
                    "UPDATE flexq_chunks SET status = ?, error = ?"
                    " WHERE job_id = ? AND idx = ? AND status = 0",
                    (status, chunk.error, job_id, chunk.chunk),
                )
                if cursor.rowcount:
                    items += chunk.items
                    succeeded += chunk.error is None
                    failed += chunk.error is not None
            db.execute(
                "UPDATE flexq_batches SET items_processed = items_processed + ?,"
                " chunks_succeeded = chunks_succeeded + ?, chunks_failed = chunks_failed + ?"
                " WHERE job_id = ?",
                (items, succeeded, failed, job_id),
            )
            return True

    async def batch_summary(self, job_id: JobId) -> tuple[BatchCounts, list[tuple[int, str]]]:
        return await self._run(self._batch_summary, job_id)

    def _batch_summary(self, job_id: JobId) -> tuple[BatchCounts, list[tuple[int, str]]]:
        db = self._db
        row = db.execute(f"SELECT {_COUNTS} FROM flexq_batches WHERE job_id = ?", (job_id,))
        found = row.fetchone()
        if found is None:
            raise JobNotFound(job_id)
        errors = db.execute(
            "SELECT idx, error FROM flexq_chunks WHERE job_id = ? AND status = ? ORDER BY idx",
            (job_id, CHUNK_FAILED),
        ).fetchall()
        return BatchCounts(bool(found[0]), *found[1:]), errors

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRecord, now: float) -> ScheduleRecord:
        return await self._run(self._put_schedule, schedule, now)

    def _put_schedule(self, schedule: ScheduleRecord, now: float) -> ScheduleRecord:
        values = (
            schedule.name, schedule.tenant, schedule.cron, schedule.timezone, schedule.task,
            schedule.args, schedule.kwargs, schedule.misfire, schedule.reserve, schedule.state,
            schedule.next_fire_time, now,
        )  # fmt: skip
        with self._transaction() as db:
            row = db.execute(
                f"INSERT INTO flexq_schedules ({_SCHEDULE_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, NULL, 1, ?)"
                " ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant,"
                " task = excluded.task, args = excluded.args, kwargs = excluded.kwargs,"
                " misfire = excluded.misfire, reserve = excluded.reserve, next_fire_time = CASE"
                "  WHEN cron = excluded.cron AND timezone = excluded.timezone"
                "  THEN next_fire_time ELSE excluded.next_fire_time END,"
                " cron = excluded.cron, timezone = excluded.timezone, revision = revision + 1"
                f" RETURNING {_SCHEDULE_COLUMNS}",
                values,
            ).fetchone()
        return _schedule(row)

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        rows = await self._run(
            self._select, f"SELECT {_SCHEDULE_COLUMNS} FROM flexq_schedules WHERE name = ?", (name,)
        )
        return _schedule(rows[0]) if rows else None

    async def list_schedules(self, tenant: str | None) -> list[ScheduleRecord]:
        sql = f"SELECT {_SCHEDULE_COLUMNS} FROM flexq_schedules"
        params: tuple[str, ...] = ()
        if tenant is not None:
            sql, params = sql + " WHERE tenant = ?", (tenant,)
        sql += " ORDER BY name"
        return [_schedule(row) for row in await self._run(self._select, sql, params)]

    async def due_schedules(
        self, tasks: Collection[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        return await self._run(self._due_schedules, sorted(tasks), now)

    def _due_schedules(
        self, tasks: list[str], now: float
    ) -> tuple[list[ScheduleRecord], float | None]:
        db = self._db
        due = [
            _schedule(row)
            for row in db.execute(
                f"SELECT {_SCHEDULE_COLUMNS} FROM flexq_schedules INDEXED BY flexq_schedules_due"
                " WHERE state = 'active' AND next_fire_time <= ? ORDER BY next_fire_time, name",
                (now,),
            )
            if row[4] in tasks
        ]
        (later,) = db.execute(
            "SELECT MIN(next_fire_time) FROM flexq_schedules INDEXED BY flexq_schedules_due"
            " WHERE state = 'active' AND next_fire_time > ?",
            (now,),
        ).fetchone()
        return due, later

    async def fire_schedule(
        self,
        name: str,
        revision: int,
        firing: ScheduleFiring,
        jobs: Sequence[NewJob],
        now: float,
    ) -> bool:
        return await self._run(self._fire_schedule, name, revision, firing, list(jobs), now)

    def _fire_schedule(
        self, name: str, revision: int, firing: ScheduleFiring, jobs: list[NewJob], now: float
    ) -> bool:
        values = (
            firing.next_fire_time, firing.previous_fire_time, len(jobs), firing.last_job_id,
            name, revision,
        )  # fmt: skip
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE flexq_schedules SET next_fire_time = ?,"
                " previous_fire_time = COALESCE(?, previous_fire_time),"
                " times_triggered = times_triggered + ?,"
                " last_job_id = COALESCE(?, last_job_id), revision = revision + 1"
                " WHERE name = ? AND revision = ? AND state = 'active'",
                values,
            )
            if cursor.rowcount == 0:
                return False
            _insert_all(db, [_insert_row(job, now) for job in jobs])
        return True

    async def set_schedule_state(
        self, name: str, revision: int, state: str, next_fire_time: float | None
    ) -> ScheduleRecord | None:
        return await self._run(self._set_schedule_state, name, revision, state, next_fire_time)

    def _set_schedule_state(
        self, name: str, revision: int, state: str, next_fire_time: float | None
    ) -> ScheduleRecord | None:
        with self._transaction() as db:
            row = db.execute(
                "UPDATE flexq_schedules SET state = ?, next_fire_time = ?, revision = revision + 1"
                f" WHERE name = ? AND revision = ? RETURNING {_SCHEDULE_COLUMNS}",
                (state, next_fire_time, name, revision),
            ).fetchone()
        return None if row is None else _schedule(row)

    async def delete_schedule(self, name: str) -> bool:
        return await self._run(self._delete_schedule, name)

    def _delete_schedule(self, name: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM flexq_schedules WHERE name = ?", (name,)).rowcount > 0

    # -- dependencies and chains -------------------------------------------------------------

    async def enqueue_dependent(self, jobs: Sequence[DependentJob], now: float) -> list[JobId]:
        return await self._run(self._enqueue_dependent, list(jobs), now)

    def _enqueue_dependent(self, jobs: list[DependentJob], now: float) -> list[JobId]:
        with self._transaction() as db:
            states = _states_of(db, {p for dependent in jobs for p in dependent.parents})
            rows: list[tuple[Any, ...]] = []
            edges: list[tuple[JobId, JobId, str]] = []
            aborted: list[tuple[JobId, str]] = []
            holding: list[NewJob] = []
            for dependent in jobs:
                job = dependent.job
                waiting: list[JobId] = []
                failed: tuple[JobId, State] | None = None
                for parent in dependent.parents:
                    state = states.get(parent)
                    if state is None:
                        raise JobNotFound(parent)
                    if not state.is_final:
                        waiting.append(parent)
                    elif state is not State.COMPLETED and dependent.on_parent_failure == "abort":
                        failed = failed or (parent, state)
                row = _insert_row(job, now)
                if failed is not None:
                    state = State.ABORTED
                    error = parent_failed_error(failed[0], failed[1], now)
                    aborted.append((job.id, dumps(error, "error")))
                elif waiting:
                    state = State.WAITING
                    policy = dependent.on_parent_failure
                    edges.extend((parent, job.id, policy) for parent in waiting)
                elif job.kind is Kind.BATCH:
                    state = State.HOLDING
                    holding.append(job)
                else:
                    state = State(row[6])
                rows.append((*row[:6], state, *row[7:]))
                states[job.id] = state
            _insert_all(db, rows)
            db.executemany(
                "INSERT INTO flexq_batches (job_id) VALUES (?)",
                [(d.job.id,) for d in jobs if d.job.kind is Kind.BATCH],
            )
            for job in holding:
                _hold(db, job.id, job.tenant)
            tenants = {job.tenant for job in holding}
            self._check_holding_room(db, tenants)
            for tenant in sorted(tenants):
                self._admit(db, tenant)
            db.executemany(
                "INSERT OR IGNORE INTO flexq_dependencies (parent_id, child_id, on_parent_failure)"
                " VALUES (?, ?, ?)",
                edges,
            )
            db.executemany(
                f"UPDATE flexq_jobs SET finished_at = ?, {_APPEND_ERROR} WHERE id = ?",
                [(now, error, job_id) for job_id, error in aborted],
            )
        return [dependent.job.id for dependent in jobs]

    async def claim_jobs(
        self,
        owner: str,
        job_ids: Collection[JobId],
        tasks: Collection[str],
        now: float,
        lease_until: float,
    ) -> list[ClaimedJob]:
        return await self._run(self._claim_jobs, owner, list(job_ids), set(tasks), now,
                               lease_until)  # fmt: skip

    def _claim_jobs(
        self, owner: str, job_ids: list[JobId], tasks: set[str], now: float, lease_until: float
    ) -> list[ClaimedJob]:
        with self._transaction() as db:
            runnable = self._runnable(db, tasks)
            if not runnable or not job_ids:
                return []
            ids = ", ".join(f"?{4 + i}" for i in range(len(job_ids)))
            marks = ", ".join(f"?{4 + len(job_ids) + i}" for i in range(len(runnable)))
            rows = db.execute(
                "UPDATE flexq_jobs SET state = 'PROCESSING', attempts = attempts + 1,"
                " started_at = ?1, lease_owner = ?2, lease_until = ?3"
                f" WHERE id IN ({ids}) AND state = 'QUEUED' AND lease_expiries = 0"
                f" AND task IN ({marks}) AND tenant NOT IN ({_PAUSED_TENANTS})"
                " RETURNING id, task, kind, tenant, priority, args, kwargs, attempts,"
                " max_attempts, timeout, parent_id, kind_rank, seq",
                (now, owner, lease_until, *job_ids, *runnable),
            ).fetchall()
        return sorted(map(_claimed, rows), key=_by_order)

    async def waiting_for(self, job_id: JobId) -> list[JobId]:
        return await self._run(self._waiting_for, job_id)

    def _waiting_for(self, job_id: JobId) -> list[JobId]:
        db = self._db
        if db.execute("SELECT 1 FROM flexq_jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise JobNotFound(job_id)
        rows = db.execute(
            "SELECT parent_id FROM flexq_dependencies WHERE child_id = ? ORDER BY parent_id",
            (job_id,),
        )
        return [parent_id for (parent_id,) in rows]

    async def chain(self, job_id: JobId) -> list[JobInfo]:
        rows = await self._run(self._select, _CHAIN, (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return [_info(row) for row in rows]

    # -- worker processes -------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        await self._run(self._write, _PUT_WORKER, tuple(worker))

    async def remove_worker(self, worker_id: str) -> None:
        await self._run(self._write, "DELETE FROM flexq_workers WHERE id = ?", (worker_id,))

    async def list_workers(self) -> list[WorkerRecord]:
        rows = await self._run(
            self._select,
            "SELECT id, host, pid, workers, lease, started_at, last_seen FROM flexq_workers"
            " ORDER BY started_at, id",
            (),
        )
        return [WorkerRecord(*row) for row in rows]

    async def prune_workers(self, seen_before: float) -> int:
        return await self._run(
            self._write, "DELETE FROM flexq_workers WHERE last_seen < ?", (seen_before,)
        )

    def _write(self, sql: str, params: Sequence[Any]) -> int:
        with self._transaction() as db:
            return db.execute(sql, params).rowcount


NO_COUNTS = BatchCounts(False, 0, 0, 0, 0, 0)

_PUT_WORKER = (
    "INSERT INTO flexq_workers (id, host, pid, workers, lease, started_at, last_seen)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen,"
    " workers = excluded.workers"
)

_HOLDING_TENANTS = """
WITH RECURSIVE holding(tenant) AS (
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_holding
            WHERE state = 'HOLDING' ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_holding
            WHERE state = 'HOLDING' AND tenant > holding.tenant ORDER BY tenant LIMIT 1)
    FROM holding WHERE holding.tenant IS NOT NULL
)
SELECT tenant FROM holding WHERE tenant IS NOT NULL
"""

_QUEUED_TENANTS = """
WITH RECURSIVE ready(tenant) AS (
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_ready
            WHERE state = 'QUEUED' AND lease_expiries = 0 ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT tenant FROM flexq_jobs INDEXED BY flexq_jobs_ready
            WHERE state = 'QUEUED' AND lease_expiries = 0 AND tenant > ready.tenant
            ORDER BY tenant LIMIT 1)
    FROM ready WHERE ready.tenant IS NOT NULL
)
SELECT tenant FROM ready WHERE tenant IS NOT NULL
"""


def _usage(db: sqlite3.Connection, tenant: str) -> tuple[int, int]:
    (holding,) = db.execute(
        "SELECT COUNT(*) FROM flexq_jobs INDEXED BY flexq_jobs_holding"
        " WHERE tenant = ? AND state = 'HOLDING'",
        (tenant,),
    ).fetchone()
    (active,) = db.execute(
        "SELECT COUNT(*) FROM flexq_jobs INDEXED BY flexq_jobs_active_batches"
        f" WHERE tenant = ? AND kind = 'batch' AND state IN ({_ACTIVE})",
        (tenant,),
    ).fetchone()
    return holding, active


def _hold(db: sqlite3.Connection, job_id: JobId, tenant: str) -> None:
    """Put a (new or released) batch job at the end of its tenant's holding queue."""
    db.execute(
        "UPDATE flexq_jobs SET state = 'HOLDING', position = ? WHERE id = ?",
        (_last_position(db, tenant) + HOLDING_STEP, job_id),
    )


def _holds(db: sqlite3.Connection, owner: str, job_id: JobId) -> bool:
    row = db.execute(f"SELECT 1 FROM flexq_jobs {_GUARD}", (job_id, owner)).fetchone()
    return row is not None


def _last_position(db: sqlite3.Connection, tenant: str) -> float:
    (last,) = db.execute(
        "SELECT MAX(position) FROM flexq_jobs INDEXED BY flexq_jobs_holding"
        " WHERE tenant = ? AND state = 'HOLDING'",
        (tenant,),
    ).fetchone()
    return 0.0 if last is None else float(last)


def _holding_row(db: sqlite3.Connection, job_id: JobId) -> tuple[str, float]:
    row = db.execute("SELECT tenant, state, position FROM flexq_jobs WHERE id = ?", (job_id,))
    found = row.fetchone()
    if found is None:
        raise JobNotFound(job_id)
    if found[1] != State.HOLDING:
        raise NotHolding(job_id, found[1])
    return found[0], found[2]


def _bounds(
    db: sqlite3.Connection, tenant: str, job_id: JobId, placement: Placement
) -> tuple[float | None, float | None]:
    """The positions (of the other HOLDING jobs) between which the job is to go."""
    others = (
        "SELECT position FROM flexq_jobs INDEXED BY flexq_jobs_holding"
        " WHERE tenant = ?1 AND state = 'HOLDING' AND id != ?2"
    )

    def one(sql: str, *params: Any) -> float | None:
        found = db.execute(sql, (tenant, job_id, *params)).fetchone()
        return None if found is None else float(found[0])

    if placement.to == "front":
        return None, one(others + " ORDER BY position LIMIT 1")
    if placement.to == "end":
        return one(others + " ORDER BY position DESC LIMIT 1"), None
    if placement.to == "index":
        low = None
        if placement.place > 0:
            low = one(others + " ORDER BY position LIMIT 1 OFFSET ?3", placement.place - 1)
            if low is None:
                return one(others + " ORDER BY position DESC LIMIT 1"), None
        high = one(
            others
            + (" AND position > ?3" if low is not None else " AND ?3 IS NULL")
            + " ORDER BY position LIMIT 1",
            low,
        )
        return low, high
    other = placement.other or ""
    other_tenant, anchor = _holding_row(db, other)
    if other_tenant != tenant:
        raise InvalidArguments(
            f"job {other!r} is in tenant {other_tenant!r}'s holding queue, not {tenant!r}'s"
        )
    if other == job_id:
        raise InvalidArguments(f"cannot move job {job_id!r} {placement.to} itself")
    if placement.to == "before":
        return one(others + " AND position < ?3 ORDER BY position DESC LIMIT 1", anchor), anchor
    return anchor, one(others + " AND position > ?3 ORDER BY position LIMIT 1", anchor)


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


def _renumber(db: sqlite3.Connection, tenant: str) -> None:
    """Spread the tenant's holding queue out again: HOLDING_STEP between neighbours."""
    db.execute(
        "WITH ranked AS (SELECT seq, ROW_NUMBER() OVER (ORDER BY position) AS n"
        " FROM flexq_jobs INDEXED BY flexq_jobs_holding WHERE tenant = ? AND state = 'HOLDING')"
        " UPDATE flexq_jobs SET position = ranked.n * ? FROM ranked"
        " WHERE flexq_jobs.seq = ranked.seq",
        (tenant, HOLDING_STEP),
    )


_SCHEDULE_COLUMNS = (
    "name, tenant, cron, timezone, task, args, kwargs, misfire, reserve, state, next_fire_time,"
    " previous_fire_time, times_triggered, last_job_id, revision, created_at"
)


def _insert_row(job: NewJob, now: float) -> tuple[Any, ...]:
    state = State.QUEUED if job.run_at <= now else State.SCHEDULED
    return (
        job.id,
        job.task,
        job.kind,
        job.kind.rank,
        job.tenant,
        job.priority,
        state,
        job.args,
        job.kwargs,
        job.max_attempts,
        job.timeout,
        now,
        job.run_at,
        job.parent_id,
        job.key,
    )


def _update_from_values(update: str, count: int) -> str:
    """``UPDATE flexq_jobs SET a = ?, b = ?`` for ``count`` jobs at once.

    Each job's values come from a VALUES row (its id, then one value per ``?``); only jobs
    still held by the owner (the last parameter) in a running state are written, and their ids
    come back.
    """
    assignments = update.removeprefix("UPDATE flexq_jobs SET ")
    width = assignments.count("?")
    for n in range(1, width + 1):
        assignments = assignments.replace("?", f"v.p{n}", 1)
    columns = ", ".join(["id", *(f"p{n}" for n in range(1, width + 1))])
    row = "(" + ", ".join("?" * (width + 1)) + ")"
    return (
        f"WITH v({columns}) AS (VALUES {', '.join([row] * count)})"
        f" UPDATE flexq_jobs SET {assignments} FROM v"
        f" WHERE flexq_jobs.id = v.id AND lease_owner = ? AND state IN ({_RUNNING})"
        " RETURNING flexq_jobs.id, flexq_jobs.tenant, flexq_jobs.kind, flexq_jobs.state"
    )


def _outcome_update(outcome: Outcome, now: float) -> tuple[str, tuple[Any, ...]]:
    state = outcome.state
    if outcome.release:
        return (
            "UPDATE flexq_jobs SET attempts = attempts - 1,"
            " state = CASE WHEN abort_requested THEN 'ABORTED' ELSE 'QUEUED' END,"
            f" finished_at = CASE WHEN abort_requested THEN ? END, {_RELEASE_LEASE}",
            (now,),
        )
    if state in (State.QUEUED, State.SCHEDULED):
        return (
            f"UPDATE flexq_jobs SET state = ?, run_at = ?, {_APPEND_ERROR}, {_RELEASE_LEASE}",
            (state, outcome.run_at, outcome.error),
        )
    if outcome.error is None:
        return (
            f"UPDATE flexq_jobs SET state = ?, result = ?, finished_at = ?, {_RELEASE_LEASE}",
            (state, outcome.result, now),
        )
    return (
        f"UPDATE flexq_jobs SET state = ?, result = ?, finished_at = ?, {_APPEND_ERROR},"
        f" {_RELEASE_LEASE}",
        (state, outcome.result, now, outcome.error),
    )


def _claimed(row: tuple[Any, ...]) -> ClaimedJob:
    return ClaimedJob(
        id=row[0], task=row[1], kind=Kind(row[2]), tenant=row[3], priority=row[4], args=row[5],
        kwargs=row[6], attempt=row[7], max_attempts=row[8], timeout=row[9], parent_id=row[10],
        order=(-row[4], row[11], row[12]),
    )  # fmt: skip


def _by_order(job: ClaimedJob) -> tuple[int, int, int]:
    return job.order


def _where(where: JobFilter) -> tuple[str, list[Any]]:
    clauses = ["1 = 1"]
    params: list[Any] = []
    for column, value in (
        ("tenant", where.tenant),
        ("state", where.state),
        ("kind", where.kind),
        ("task", where.task),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(str(value))
    if where.created_after is not None:
        clauses.append("created_at >= ?")
        params.append(where.created_after)
    if where.created_before is not None:
        clauses.append("created_at < ?")
        params.append(where.created_before)
    return " AND ".join(clauses), params


def _info(row: tuple[Any, ...]) -> JobInfo:
    return job_info(
        id=row[1],
        task=row[2],
        kind=row[3],
        tenant=row[4],
        priority=row[5],
        state=row[6],
        args=row[7],
        kwargs=row[8],
        attempts=row[9],
        max_attempts=row[10],
        created_at=row[11],
        run_at=row[12],
        started_at=row[13],
        finished_at=row[14],
        result=row[15],
        errors=row[16],
        parent_id=row[17],
        key=row[18],
        progress=row[19],
        abort_requested=row[20],
        batch=None if row[21] is None else BatchCounts(bool(row[21]), *row[22:27]),
        callouts=row[27],
    )


_CHAIN = f"""
WITH RECURSIVE
    up(id, parent_id) AS (
        SELECT id, parent_id FROM flexq_jobs WHERE id = ?1
        UNION
        SELECT j.id, j.parent_id FROM flexq_jobs j JOIN up ON j.id = up.parent_id
    ),
    down(id) AS (
        SELECT ?1
        UNION
        SELECT j.id FROM flexq_jobs j JOIN down ON j.parent_id = down.id
    )
SELECT {_INFO_COLUMNS} FROM {_INFO_FROM}
WHERE id IN (SELECT id FROM up UNION SELECT id FROM down)
ORDER BY seq
"""


def _has_dependencies(db: sqlite3.Connection) -> bool:
    """Whether any job waits for another: most queues never have one, and skip the rest."""
    return db.execute("SELECT 1 FROM flexq_dependencies LIMIT 1").fetchone() is not None


def _states_of(db: sqlite3.Connection, job_ids: Collection[JobId]) -> dict[JobId, State]:
    ids = list(job_ids)
    states: dict[JobId, State] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT id, state FROM flexq_jobs WHERE id IN ({marks})", chunk)
        states.update((job_id, State(state)) for job_id, state in rows)
    return states


def _final_states(db: sqlite3.Connection, job_ids: list[JobId]) -> list[tuple[JobId, State]]:
    return [(i, s) for i, s in _states_of(db, job_ids).items() if s.is_final]


def _release_dependants(
    db: sqlite3.Connection, finished: list[tuple[JobId, State]], now: float
) -> set[str]:
    """Release or abort the WAITING dependants of jobs that just became final; return the
    tenants whose holding queues got batch jobs (to admit them).

    A dependant with no parent left becomes QUEUED (SCHEDULED until its run_at; a batch job
    enters the end of its holding queue, even a full one); one whose
    parent failed ends ABORTED with an error naming the parent (unless its policy is "run"),
    and its own dependants are dealt with in turn. Each parent costs index lookups, whatever
    the number of its siblings, so a fan-in of many parents stays linear.
    """
    holding: set[str] = set()
    while finished:
        states = dict(finished)
        finished = []
        parents = list(states)
        edges: list[tuple[JobId, JobId, str]] = []
        for start in range(0, len(parents), 500):
            chunk = parents[start : start + 500]
            marks = ",".join("?" * len(chunk))
            edges += db.execute(
                "SELECT parent_id, child_id, on_parent_failure FROM flexq_dependencies"
                f" WHERE parent_id IN ({marks})",
                chunk,
            ).fetchall()
            db.execute(f"DELETE FROM flexq_dependencies WHERE parent_id IN ({marks})", chunk)
        failed_parent: dict[JobId, JobId] = {}
        for parent, child, policy in edges:
            if states[parent] is not State.COMPLETED and policy == "abort":
                failed_parent.setdefault(child, parent)
        for child, parent in failed_parent.items():
            db.execute("DELETE FROM flexq_dependencies WHERE child_id = ?", (child,))
            error = dumps(parent_failed_error(parent, states[parent], now), "error")
            row = db.execute(
                f"UPDATE flexq_jobs SET state = 'ABORTED', finished_at = ?, {_APPEND_ERROR}"
                " WHERE id = ? AND state = 'WAITING' RETURNING id",
                (now, error, child),
            ).fetchone()
            if row is not None:
                finished.append((child, State.ABORTED))
        released = sorted({child for _, child, _ in edges} - failed_parent.keys())
        for start in range(0, len(released), 500):
            chunk = released[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                "UPDATE flexq_jobs SET state = CASE WHEN kind = 'batch' THEN 'WAITING'"
                " WHEN run_at <= ? THEN 'QUEUED' ELSE 'SCHEDULED' END"
                f" WHERE id IN ({marks}) AND state = 'WAITING' AND NOT EXISTS"
                " (SELECT 1 FROM flexq_dependencies d WHERE d.child_id = flexq_jobs.id)"
                " RETURNING id, tenant, kind",
                [now, *chunk],
            ).fetchall()
            for job_id, tenant, kind in sorted(rows):
                if kind == Kind.BATCH:
                    _hold(db, job_id, tenant)
                    holding.add(tenant)
    return holding


def _schedule(row: tuple[Any, ...]) -> ScheduleRecord:
    return ScheduleRecord(
        name=row[0], tenant=row[1], cron=row[2], timezone=row[3], task=row[4], args=row[5],
        kwargs=row[6], misfire=row[7], reserve=bool(row[8]), state=row[9],
        next_fire_time=row[10], previous_fire_time=row[11], times_triggered=row[12],
        last_job_id=row[13], revision=row[14], created_at=row[15],
    )  # fmt: skip
