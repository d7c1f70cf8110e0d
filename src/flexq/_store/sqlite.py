"""The SQLite store: one file, shared safely by several processes (WAL, BEGIN IMMEDIATE).

The sqlite3 connection lives on a thread of its own (:class:`DatabaseThread`), so the same code
serves asyncio and trio, each call is one round trip to that thread, and a whole transaction
(many statements) runs in that one round trip. Cancelling a caller waits for its transaction to
end: a transaction is never left half done.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from flexq._errors import DuplicateJob, FlexqError, InvalidArguments, JobNotFound, StoreError
from flexq._models import JobId, JobInfo, Pause, PauseScope, timestamp_to_datetime
from flexq._serialize import dumps
from flexq._states import FINAL_STATES, RUNNING_STATES, Kind, State, check_transition
from flexq._store._thread import DatabaseThread
from flexq._store.base import (
    ClaimedJob,
    EnqueueResult,
    EnqueueUnit,
    JobFilter,
    NewJob,
    Outcome,
    Recovered,
    checked_outcomes,
    job_info,
    lease_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

T = TypeVar("T")

SCHEMA_VERSION = 1

_FINAL = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
_RUNNING = ",".join(f"'{s}'" for s in sorted(RUNNING_STATES))

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
    abort_requested INTEGER NOT NULL DEFAULT 0
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
"""

_INFO_COLUMNS = (
    "seq, id, task, kind, tenant, priority, state, args, kwargs, attempts, max_attempts, "
    "created_at, run_at, started_at, finished_at, result, errors, parent_id, key, progress, "
    "abort_requested"
)

_INSERT = (
    "INSERT INTO flexq_jobs (id, task, kind, kind_rank, tenant, priority, state, args, kwargs,"
    " max_attempts, timeout, created_at, run_at, parent_id, key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ROWS_PER_INSERT = 500
_INSERT_MANY = _INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (_ROWS_PER_INSERT - 1)


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


_CLAIM = """
UPDATE flexq_jobs
SET state = 'PROCESSING', attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq IN (
    SELECT seq FROM ({best_of_each_task})
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


_CLAIM_CHOSEN = """
UPDATE flexq_jobs
SET state = 'PROCESSING', attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq IN ({chosen}) AND state = 'QUEUED'
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

_CLAIM_SUSPECT = """
UPDATE flexq_jobs
SET state = 'PROCESSING', attempts = attempts + 1, started_at = ?1, lease_owner = ?2,
    lease_until = ?3
WHERE seq = ({suspect})
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
    """Jobs in one SQLite file (or ``:memory:``)."""

    def __init__(
        self, path: str, *, synchronous: str = "NORMAL", busy_timeout: float = 30.0
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise InvalidArguments(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._thread = DatabaseThread(f"flexq-sqlite:{path}")

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

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM flexq_meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO flexq_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise FlexqError(
                    f"{self.path} has flexq schema version {row[0]}, newer than this flexq "
                    f"understands ({SCHEMA_VERSION}): upgrade flexq"
                )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

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
                if all(job.key is None for job in unit.jobs):
                    unkeyed.extend(_insert_row(job, now) for job in unit.jobs)
                    results.append([job.id for job in unit.jobs])
                    continue
                _insert_all(db, unkeyed)  # keep creation order: earlier units first
                unkeyed.clear()
                db.execute("SAVEPOINT flexq_unit")
                try:
                    results.append(self._insert_keyed(db, unit, now))
                except DuplicateJob as duplicate:
                    db.execute("ROLLBACK TO flexq_unit")
                    results.append(duplicate)
                db.execute("RELEASE flexq_unit")
            _insert_all(db, unkeyed)
        return results

    def _insert_keyed(self, db: sqlite3.Connection, unit: EnqueueUnit, now: float) -> list[JobId]:
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
            ids.append(job.id)
        return ids

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
            by_update.setdefault(update, []).append((outcome.job_id, *params))
        written: list[JobId] = []
        with self._transaction() as db:
            for update, rows in by_update.items():
                for start in range(0, len(rows), _ROWS_PER_INSERT):
                    chunk = rows[start : start + _ROWS_PER_INSERT]
                    statement = _update_from_values(update, len(chunk))
                    values = [v for row in chunk for v in row]
                    written.extend(row[0] for row in db.execute(statement, [*values, owner]))
        return written

    async def renew(self, owner: str, lease_until: float) -> list[JobId]:
        return await self._run(self._renew, owner, lease_until)

    def _renew(self, owner: str, lease_until: float) -> list[JobId]:
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE flexq_jobs INDEXED BY flexq_jobs_leases SET lease_until = ?"
                f" WHERE state IN ({_RUNNING})"
                " AND lease_owner = ? RETURNING id, abort_requested",
                (lease_until, owner),
            ).fetchall()
        return [job_id for job_id, abort_requested in rows if abort_requested]

    async def recover(self, now: float, max_lease_expiries: int) -> Recovered:
        return await self._run(self._recover, now, max_lease_expiries)

    def _recover(self, now: float, max_lease_expiries: int) -> Recovered:
        recovered = Recovered(requeued=[], failed=[], aborted=[])
        with self._transaction() as db:
            expired = db.execute(
                "SELECT id, attempts, lease_expiries, abort_requested FROM flexq_jobs"
                f" INDEXED BY flexq_jobs_leases WHERE state IN ({_RUNNING}) AND lease_until < ?",
                (now,),
            ).fetchall()
            for job_id, attempts, expiries, abort_requested in expired:
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
            row = db.execute("SELECT state FROM flexq_jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            state = State(row[0])
            if state in RUNNING_STATES:
                db.execute("UPDATE flexq_jobs SET abort_requested = 1 WHERE id = ?", (job_id,))
                return state
            check_transition(state, State.ABORTED, job_id)
            db.execute(
                "UPDATE flexq_jobs SET state = 'ABORTED', abort_requested = 1, finished_at = ?"
                " WHERE id = ?",
                (now, job_id),
            )
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
            cursor = db.execute(
                "DELETE FROM flexq_jobs WHERE seq IN (SELECT seq FROM flexq_jobs"
                " INDEXED BY flexq_jobs_finished"
                f" WHERE finished_at < ? AND state IN ({_FINAL}) ORDER BY finished_at, seq"
                " LIMIT ?)",
                (finished_before, limit),
            )
            return cursor.rowcount

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
            self._select, f"SELECT {_INFO_COLUMNS} FROM flexq_jobs WHERE id = ?", (job_id,)
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
                f"SELECT {_INFO_COLUMNS} FROM flexq_jobs WHERE id IN ({marks})",
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
            f"SELECT {_INFO_COLUMNS} FROM flexq_jobs WHERE {clause} ORDER BY seq LIMIT ? OFFSET ?",
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
        " RETURNING flexq_jobs.id"
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
    )
