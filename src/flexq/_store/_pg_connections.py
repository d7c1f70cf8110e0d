"""The PostgreSQL store's connections: psycopg's async API under asyncio, its blocking API on
threads under trio, and one face for the store's SQL code either way.

The store's SQL code is written once, as coroutines that take a :class:`Conn` and await only
it. Under asyncio, they run on the event loop with :class:`psycopg.AsyncConnection` objects
from :class:`AsyncConnections`. Under trio, where psycopg's async API does not work, they run
on :class:`ThreadConnections`' threads, each with a blocking :class:`psycopg.Connection`
wrapped in a :class:`BlockingConnection`, whose coroutines never suspend: :func:`run_blocking`
runs one to its end on the thread, like a plain function.

Both pools behave alike. A connection is opened on first use, and again before a call if its
idle connection was closed by the server (a restart, ``pg_terminate_backend``) or after a call
broke it: the database going away fails the calls made while it is away (psycopg errors, which
the store turns into StoreError and every caller retries) and no more. While the server cannot
be reached, attempts to connect back off (:data:`CONNECT_BACKOFF`) and calls in between fail
at once. A call that was started runs to its end even if its caller is cancelled: a
transaction is never left half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import psycopg
import structlog
from psycopg.pq import TransactionStatus

from flexq._cancellation import to_the_end
from flexq._errors import FlexqError
from flexq._store._thread import Call, EventCall, call_type

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
    from contextlib import AbstractAsyncContextManager

T = TypeVar("T")

log = structlog.get_logger("flexq")

Row = tuple[Any, ...]
Connection = psycopg.Connection[Row]
AsyncConnection = psycopg.AsyncConnection[Row]

CONNECT_BACKOFF = (0.05, 1.0)
"""After a failed attempt to connect, the store waits this long (the first, doubling up to the
second while attempts fail) before it tries again; calls in between fail at once."""


class Cursor(Protocol):
    """What the store's SQL code reads off a statement it ran."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Sequence[Any] | None: ...

    async def fetchone(self) -> Row | None: ...

    async def fetchall(self) -> list[Row]: ...


class Conn(Protocol):
    """A connection as the store's SQL code uses it: a :class:`psycopg.AsyncConnection`, or a
    :class:`BlockingConnection`."""

    async def execute(self, query: str, params: Any = None) -> Cursor: ...

    def transaction(self) -> AbstractAsyncContextManager[Any]: ...

    def pipeline(self) -> AbstractAsyncContextManager[Any]: ...


async def fetch_all(conn: Conn, query: str, params: Any = None) -> list[Row]:
    """Every row of a statement."""
    return await (await conn.execute(query, params)).fetchall()


async def fetch_one(conn: Conn, query: str, params: Any = None) -> Row | None:
    """The first row of a statement (None if it has none)."""
    return await (await conn.execute(query, params)).fetchone()


class _BlockingCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: psycopg.Cursor[Row]) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Sequence[Any] | None:
        return self._cursor.description

    async def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()


class BlockingConnection:
    """A blocking psycopg connection with the face of an async one: its coroutines do their
    work when they are started and never suspend (see :func:`run_blocking`)."""

    __slots__ = ("connection",)

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def execute(self, query: str, params: Any = None) -> _BlockingCursor:
        return _BlockingCursor(self.connection.execute(query, params))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        with self.connection.transaction():
            yield

    @contextlib.asynccontextmanager
    async def pipeline(self) -> AsyncIterator[None]:
        with self.connection.pipeline():
            yield


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run to its end, on this thread, a coroutine that awaits only a BlockingConnection."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the store's SQL code awaited something other than its connection")


def dropped(conn: Connection | AsyncConnection) -> bool:
    """Whether the server sent something to an idle connection. It does so when it closes the
    connection (a FATAL error, then end of file); the rare other messages (a notice, a changed
    parameter) cost a needless reconnection, which is harmless."""
    if conn.closed or conn.broken:
        return True
    return bool(readable([conn.fileno()], 0.0))


def readable(fds: Sequence[int], timeout: float) -> list[int]:
    """Those of ``fds`` that are readable (or closed) within ``timeout`` seconds.

    ``poll``, not ``select``: a busy application's sockets have numbers past 1023, which
    ``select`` refuses."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


def reusable(conn: Connection | AsyncConnection) -> bool:
    """Whether a connection whose call failed can serve the next: it is not dropped, and the
    failure left no transaction open (an error inside a pipeline can leave one)."""
    return not dropped(conn) and conn.info.transaction_status == TransactionStatus.IDLE


class _Openings:
    """A pool's attempts to connect, let through except shortly after attempts failed
    (backoff), and the server processes of the connections it opened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: str | None = None
        """Why the last attempt to connect failed, until one succeeds."""
        self._pause = 0.0
        self._next_attempt = 0.0
        self._backends: dict[int, int] = {}
        """The server process of each open connection (by the connection's id): read when it
        opens, as a broken connection no longer knows it."""

    @property
    def backend_pids(self) -> set[int]:
        """The server processes of the open connections: their notifications are our own."""
        with self._lock:  # read by the LISTEN thread
            return set(self._backends.values())

    def check(self) -> None:
        """Raise OperationalError if attempts failed lately and the pause is not over."""
        with self._lock:
            wait = self._next_attempt - time.monotonic()
            if self._refused is not None and wait > 0:
                raise psycopg.OperationalError(
                    f"{self._refused} (the next attempt to connect is in {wait:.2f} s)"
                )

    def failed(self, error: psycopg.Error) -> None:
        with self._lock:
            now = time.monotonic()
            if now >= self._next_attempt:  # not already pausing after another attempt's failure
                low, high = CONNECT_BACKOFF
                self._pause = min(max(2 * self._pause, low), high)
                self._next_attempt = now + self._pause
            self._refused = str(error).strip()

    def opened(self, conn: Connection | AsyncConnection) -> None:
        with self._lock:
            self._refused, self._pause = None, 0.0
            self._backends[id(conn)] = conn.info.backend_pid

    def closing(self, conn: Connection | AsyncConnection) -> None:
        with self._lock:
            self._backends.pop(id(conn), None)


class ThreadConnections:
    """Blocking connections, each on a thread of its own, taking calls off one queue.

    A call is ``fn(connection, *args)``, run with :func:`run_blocking`.
    """

    def __init__(self, name: str, size: int, connect: Callable[[], Connection]) -> None:
        self._name = name
        self._size = size
        self._connect = connect
        self._openings = _Openings()
        self._calls: queue.SimpleQueue[Call[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._call_type: type[Call[Any]] = EventCall

    @property
    def backend_pids(self) -> set[int]:
        """The server processes of these connections: their notifications are our own."""
        return self._openings.backend_pids

    def start(self) -> None:
        self._call_type = call_type()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
            for i in range(self._size)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._calls.put(None)
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join)

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        if not self._threads:
            raise FlexqError("the PostgreSQL store is not open")
        call = self._call_type(fn, args)  # the thread stores the coroutine's result
        self._calls.put(call)
        result: T = await call.outcome()
        return result

    def _serve(self) -> None:
        conn: BlockingConnection | None = None
        try:
            while (call := self._calls.get()) is not None:
                try:
                    if conn is not None and dropped(conn.connection):
                        self._close(conn)
                        conn = None
                    if conn is None:
                        conn = BlockingConnection(self._open())
                    call.result = run_blocking(call.fn(conn, *call.args))
                except BaseException as exc:
                    call.error = exc
                    conn = self._kept_after_failure(conn)
                finally:
                    call.notify()
        finally:
            if conn is not None:
                self._close(conn)

    def _kept_after_failure(self, conn: BlockingConnection | None) -> BlockingConnection | None:
        """The connection whose call failed if it can serve the next, else None (closed)."""
        if conn is None:
            return None
        try:
            if reusable(conn.connection):
                return conn
            self._close(conn)
        except Exception as exc:  # the thread must go on serving the calls that follow
            log.warning("dropping a failed PostgreSQL connection failed", error=repr(exc))
        return None

    def _open(self) -> Connection:
        self._openings.check()
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            self._openings.failed(exc)
            raise
        self._openings.opened(conn)
        return conn

    def _close(self, conn: BlockingConnection) -> None:
        self._openings.closing(conn.connection)
        conn.connection.close()


class AsyncConnections:
    """Async connections on the asyncio event loop: at most ``size`` calls run at once, each
    on an idle connection (or a new one)."""

    def __init__(self, size: int, connect: Callable[[], Awaitable[AsyncConnection]]) -> None:
        self._size = size
        self._connect = connect
        self._openings = _Openings()
        self._idle: list[AsyncConnection] = []
        self._slots: asyncio.Semaphore | None = None
        """asyncio's own: a call that finds a free place goes on at once, where anyio's would
        yield to the event loop first."""
        self._stopping = False

    @property
    def backend_pids(self) -> set[int]:
        """The server processes of these connections: their notifications are our own."""
        return self._openings.backend_pids

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self._size)
        self._stopping = False

    async def stop(self) -> None:
        """Refuse new calls, let those under way or waiting for a connection end, then close
        the connections."""
        slots = self._slots
        if slots is None or self._stopping:
            return
        self._stopping = True
        await to_the_end(self._close_all(slots))
        self._slots = None

    async def _close_all(self, slots: asyncio.Semaphore) -> None:
        for _ in range(self._size):  # after the calls that wait: the semaphore is first come
            await slots.acquire()
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._close(conn)

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        slots = self._slots
        if slots is None or self._stopping:
            raise FlexqError("the PostgreSQL store is not open")
        async with slots:
            return await to_the_end(self._call(fn, args))

    async def _call(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is not None and dropped(conn):
                await self._close(conn)
                conn = None
            if conn is None:
                conn = await self._open()
            return await fn(conn, *args)
        except BaseException:
            if conn is not None and not reusable(conn):
                await self._close(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                self._idle.append(conn)

    async def _open(self) -> AsyncConnection:
        self._openings.check()
        try:
            conn = await self._connect()
        except psycopg.Error as exc:
            self._openings.failed(exc)
            raise
        self._openings.opened(conn)
        return conn

    async def _close(self, conn: AsyncConnection) -> None:
        self._openings.closing(conn)
        await conn.close()
