"""Batch jobs: ``start`` yields items, ``execute`` runs over chunks of them, ``finish`` ends.

The runner hands a claimed batch job to :class:`BatchRun`, which

1. streams the items ``start`` yields into the store, ``FLUSH_CHUNKS`` chunks per
   transaction, and marks them committed with the move to PROCESSING (a crash before that
   re-runs ``start`` from scratch; a crash after never does);
2. runs ``execute`` on each chunk without a checkpoint, up to ``concurrency`` at once, each try
   of a chunk up to the batch's ``retries`` more times, and writes checkpoints in groups;
3. runs ``finish`` once with the :class:`BatchSummary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import traceback
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import structlog

from flexq._context import Context
from flexq._errors import InvalidArguments, NotRetried, qualified_name
from flexq._models import timestamp_to_datetime
from flexq._serialize import dumps, loads
from flexq._states import Kind
from flexq._store.base import ChunkDone, error_record
from flexq._task import Task, check_options

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from datetime import datetime

    from flexq._backoff import Backoff
    from flexq._models import JSON, JobId
    from flexq._queue import Queue
    from flexq._store.base import ClaimedJob, Store

log = structlog.get_logger("flexq")

C = TypeVar("C", bound=type)

FLUSH_CHUNKS = 50
"""Chunks of items ``start`` yields that go to the store in one transaction: what a batch
keeps in memory while it streams its items."""
PAGE_CHUNKS = 64
"""Chunks read back from the store at a time while processing."""
CHECKPOINT_GROUP = 16
"""A checkpoint is written once this many chunks ended, or ``CHECKPOINT_DELAY`` after the
first of them, whichever comes first."""
CHECKPOINT_DELAY = 0.1
STOP_CHECKPOINT_TIMEOUT = 2.0
"""How long a stopped batch may take to record the chunks that ended before it stopped."""
MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""The largest a chunk's items may be, encoded as JSON."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSpec:
    """What makes a registered task a batch: its class and how it cuts items into chunks."""

    cls: type
    scope: int
    """Items per chunk."""
    concurrency: int
    """Chunks of one batch job that may run at once."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkError:
    """A chunk that failed every try: what its last try raised."""

    chunk: int
    """The chunk's 0-based index."""
    type: str
    message: str
    traceback: str
    tries: int
    at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSummary:
    """How a batch job's chunks went; what ``finish`` receives."""

    job_id: JobId
    total_items: int
    items_processed: int
    chunks_total: int
    chunks_succeeded: int
    chunks_failed: int
    errors: tuple[ChunkError, ...]
    """One per failed chunk, by chunk index."""

    @property
    def ok(self) -> bool:
        """Whether every chunk succeeded."""
        return not self.chunks_failed


class BatchContext(Context):
    """The context of a batch job's ``start``, ``execute`` and ``finish``.

    Each call gets its own, so ``max_children_per_run`` counts per call.
    """

    def __init__(self, queue: Queue, job: ClaimedJob, owner: str, chunk: int | None) -> None:
        super().__init__(queue, job, owner)
        self._chunk = chunk

    @property
    def chunk(self) -> int | None:
        """The index of the chunk ``execute`` runs on (None in ``start`` and ``finish``)."""
        return self._chunk

    async def set_progress(self, progress: JSON) -> None:
        """Not for batch jobs: their progress is their chunk counts."""
        raise InvalidArguments("a batch job's progress is counted by its chunks")


def make_batch_task(
    cls: C,
    *,
    name: str | None,
    scope: int,
    retries: int,
    concurrency: int,
    timeout: float | None,
    priority: int,
    backoff: Backoff | None,
) -> Task[Any]:
    """Validate a batch class and its options into a :class:`Task` of kind BATCH."""
    if not isinstance(cls, type):
        raise InvalidArguments(f"@queue.batch decorates a class, not {cls!r}")
    for method in ("start", "execute", "finish"):
        fn = getattr(cls, method, None)
        if fn is None:
            raise InvalidArguments(f"batch class {cls.__qualname__} has no {method}() method")
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise InvalidArguments(
                f"{cls.__qualname__}.{method} must be `async def` (start may be an async generator)"
            )
    for option, value in (("scope", scope), ("concurrency", concurrency)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArguments(f"{option} must be an int >= 1, not {value!r}")
    task_name = check_options(cls, name=name, retries=retries, timeout=timeout, priority=priority)
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise InvalidArguments(
            f"batch class {cls.__qualname__} must be constructible without arguments"
        ) from None
    start = getattr(cls, "start")  # noqa: B009 (a class of any type)
    parameters = list(inspect.signature(start).parameters.values())
    if len(parameters) < 2:
        raise InvalidArguments(f"{cls.__qualname__}.start must take (self, ctx, ...)")
    signature = inspect.signature(start).replace(parameters=parameters[2:])
    return Task(
        name=task_name, fn=start, kind=Kind.BATCH, retries=retries, timeout=timeout,
        priority=priority, backoff=backoff, context_parameter=None, signature=signature,
        context_position=None, batch=BatchSpec(cls, scope, concurrency),
    )  # fmt: skip


class LeaseLost(Exception):
    """This process no longer holds the batch job (its lease expired and another took it)."""


class BatchRun:
    """One attempt of a batch job: start (unless committed), the chunks left, finish."""

    def __init__(
        self,
        *,
        queue: Queue,
        store: Store,
        owner: str,
        task: Task[Any],
        job: ClaimedJob,
        backoff: Backoff,
        clock: Callable[[], float],
        on_checkpoint: Callable[[], None],
    ) -> None:
        assert task.batch is not None
        self._queue = queue
        self._store = store
        self._owner = owner
        self._task = task
        self._spec = task.batch
        self._job = job
        self._backoff = task.backoff or backoff
        self._clock = clock
        self._on_checkpoint: Callable[[], None] | None = on_checkpoint
        """Called after the attempt's first checkpoint is written."""
        self._unwritten: list[ChunkDone] = []
        self._unwritten_event = anyio.Event()
        self._processing = True

    def _context(self, chunk: int | None = None) -> BatchContext:
        return BatchContext(self._queue, self._job, self._owner, chunk)

    async def run(self) -> str | None:
        """Run the attempt; return ``finish``'s result as JSON (None if it returned None)."""
        job = self._job
        counts = await self._store.begin_batch(self._owner, job.id)
        if counts is None:
            raise LeaseLost(f"batch job {job.id!r} is no longer held by this process")
        instance = self._spec.cls()
        if not counts.prepared:
            args = loads(job.args) if job.args != "[]" else []
            kwargs = loads(job.kwargs) if job.kwargs != "{}" else {}
            await self._prepare(instance, args, kwargs)
        await self._process(instance)
        summary = await read_summary(self._store, job.id)
        try:
            value = await instance.finish(self._context(), summary)
        except Exception as exc:
            raise NotRetried(exc) from exc
        if value is None:
            return None
        try:
            return dumps(value, "a batch's finish() return value")
        except InvalidArguments as exc:
            raise NotRetried(exc) from None

    # -- start ------------------------------------------------------------------------------

    async def _prepare(self, instance: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        produced = instance.start(self._context(), *args, **kwargs)
        if inspect.isawaitable(produced):
            produced = await produced
        chunk: list[Any] = []
        pending: list[tuple[int, str]] = []
        written = total = 0
        scope = self._spec.scope

        async def cut() -> None:
            nonlocal written
            pending.append((len(chunk), _encode_chunk(chunk)))
            chunk.clear()
            if len(pending) >= FLUSH_CHUNKS:
                await self._add(written, pending)
                written += len(pending)
                pending.clear()
            else:
                await anyio.lowlevel.checkpoint()

        if hasattr(produced, "__aiter__"):
            async for item in produced:
                chunk.append(item)
                total += 1
                if len(chunk) >= scope:
                    await cut()
        else:
            try:
                iterator = iter(produced)
            except TypeError:
                raise NotRetried(
                    InvalidArguments(
                        f"{self._task.name}.start must return or yield items, not {produced!r}"
                    )
                ) from None
            for item in iterator:
                chunk.append(item)
                total += 1
                if len(chunk) >= scope:
                    await cut()
        if chunk:
            await cut()
        if pending:
            await self._add(written, pending)
            written += len(pending)
        if not await self._store.end_preparing(self._owner, self._job.id, total, written):
            raise LeaseLost(f"batch job {self._job.id!r} is no longer held by this process")
        log.info("batch prepared", job_id=self._job.id, tenant=self._job.tenant,
                 task=self._job.task, items=total, chunks=written)  # fmt: skip

    async def _add(self, first: int, chunks: list[tuple[int, str]]) -> None:
        if not await self._store.add_chunks(self._owner, self._job.id, first, chunks):
            raise LeaseLost(f"batch job {self._job.id!r} is no longer held by this process")

    # -- chunks -----------------------------------------------------------------------------

    async def _process(self, instance: Any) -> None:
        try:
            await self._process_chunks(instance)
        except ExceptionGroup as group:
            # A store failure or a lost lease in one task: report it, not the groups around it.
            first: Exception = group
            while isinstance(first, ExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            if self._unwritten:  # stopped (abort, shutdown): keep what the chunks that ended did
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    with anyio.move_on_after(STOP_CHECKPOINT_TIMEOUT):
                        await self._store.checkpoint(self._owner, self._job.id, self._unwritten)

    async def _process_chunks(self, instance: Any) -> None:
        after = -1
        async with anyio.create_task_group() as group:
            group.start_soon(self._write_checkpoints)
            slots = anyio.Semaphore(self._spec.concurrency)
            async with anyio.create_task_group() as chunks:
                while page := await self._store.pending_chunks(self._job.id, after, PAGE_CHUNKS):
                    after = page[-1][0]
                    for index, items in page:
                        if self._spec.concurrency == 1:
                            self._done(await self._run_chunk(instance, index, items))
                            continue
                        await slots.acquire()
                        chunks.start_soon(self._run_chunk_in_slot, instance, index, items, slots)
            self._processing = False
            self._unwritten_event.set()

    async def _run_chunk_in_slot(
        self, instance: Any, index: int, items: str, slots: anyio.Semaphore
    ) -> None:
        try:
            self._done(await self._run_chunk(instance, index, items))
        finally:
            slots.release()

    def _done(self, chunk: ChunkDone) -> None:
        self._unwritten.append(chunk)
        if len(self._unwritten) in (1, CHECKPOINT_GROUP):
            self._unwritten_event.set()

    async def _write_checkpoints(self) -> None:
        # The first chunk to end after a write wakes the writer, which then gives the group
        # CHECKPOINT_DELAY to fill; a full group, or the end of processing, cuts that short.
        # The event is renewed after each write, so a chunk that ended during the write still
        # gets the delay rather than an immediate write of its own.
        while self._processing or self._unwritten:
            if not self._unwritten:
                await self._unwritten_event.wait()
                self._unwritten_event = anyio.Event()
            if len(self._unwritten) < CHECKPOINT_GROUP and self._processing:
                with anyio.move_on_after(CHECKPOINT_DELAY):
                    await self._unwritten_event.wait()
            done = list(self._unwritten)
            if not done:
                continue
            # Taken off the list only once written: if the write is cancelled (abort,
            # shutdown), the stop's last checkpoint still records them (a repeat counts once).
            if not await self._store.checkpoint(self._owner, self._job.id, done):
                raise LeaseLost(f"batch job {self._job.id!r} is no longer held by this process")
            del self._unwritten[: len(done)]
            self._unwritten_event = anyio.Event()
            if self._on_checkpoint is not None:
                self._on_checkpoint()
                self._on_checkpoint = None

    async def _run_chunk(self, instance: Any, index: int, encoded: str) -> ChunkDone:
        items = loads(encoded)
        tries = self._task.max_attempts
        for attempt in range(1, tries + 1):
            try:
                if self._task.timeout is None:
                    await instance.execute(self._context(index), items)
                else:
                    with anyio.fail_after(self._task.timeout):
                        await instance.execute(self._context(index), items)
            except Exception as exc:
                fields = {"job_id": self._job.id, "tenant": self._job.tenant, "chunk": index,
                          "attempt": attempt, "error": repr(exc)}  # fmt: skip
                if attempt < tries:
                    delay = self._backoff.delay(attempt)
                    log.warning("batch chunk failed, will retry", delay=round(delay, 3), **fields)
                    await anyio.sleep(delay)
                    continue
                log.error("batch chunk failed", **fields)
                record = error_record(
                    qualified_name(type(exc)),
                    str(exc),
                    "".join(traceback.format_exception(exc)),
                    attempt,
                    self._clock(),
                )
                return ChunkDone(index, len(items), dumps(record, "error"))
            break
        return ChunkDone(index, len(items))


def _encode_chunk(items: Sequence[Any]) -> str:
    try:
        encoded = dumps(items, "batch items")
    except InvalidArguments as exc:
        raise NotRetried(exc) from None
    if len(encoded) > MAX_CHUNK_BYTES:
        raise NotRetried(
            InvalidArguments(
                f"a chunk of {len(items)} items is {len(encoded)} bytes of JSON, more than"
                f" {MAX_CHUNK_BYTES}: use a smaller scope or smaller items"
            )
        )
    return encoded


async def read_summary(store: Store, job_id: JobId) -> BatchSummary:
    """The batch job's summary as the store holds it now."""
    counts, errors = await store.batch_summary(job_id)
    return BatchSummary(
        job_id=job_id,
        total_items=counts.total_items,
        items_processed=counts.items_processed,
        chunks_total=counts.chunks_total,
        chunks_succeeded=counts.chunks_succeeded,
        chunks_failed=counts.chunks_failed,
        errors=tuple(_chunk_error(index, loads(error)) for index, error in errors),
    )


def _chunk_error(index: int, record: dict[str, Any]) -> ChunkError:
    return ChunkError(
        chunk=index,
        type=record["type"],
        message=record["message"],
        traceback=record["traceback"],
        tries=record["attempt"],
        at=timestamp_to_datetime(record["at"]),
    )
