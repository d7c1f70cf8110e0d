"""A thread of its own for a blocking database connection, usable from asyncio and trio.

Calls queue up and run in order, back to back, without waiting for the event loop between
them; each caller is woken through its loop's thread-safe scheduling. This is what aiosqlite
does for asyncio, done here for both loops, and with a whole transaction per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.to_thread

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("args", "done", "error", "fn", "notify", "result")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()
        self.notify = _threadsafe(self.done.set)

    async def outcome(self) -> T:
        """Wait for the call to end, even if cancelled meanwhile; return its result or raise
        its error."""
        with anyio.CancelScope(shield=True):
            await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class DatabaseThread:
    """Runs blocking calls one after another on a dedicated daemon thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread has been started and not stopped."""
        return self._thread is not None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Let queued calls finish, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            await anyio.to_thread.run_sync(thread.join)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its error).

        Cancelling the caller does not stop a call that was queued: it waits for it to end, so
        that a transaction is never abandoned half done.
        """
        call = _Call(fn, args)
        self._calls.put(call)
        return await call.outcome()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call.result = call.fn(*call.args)
            except BaseException as exc:
                call.error = exc
            call.notify()


def _threadsafe(callback: Callable[[], object]) -> Callable[[], None]:
    """A function that any thread may call to run ``callback`` soon in the current loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return _trio_soon(trio.lowlevel.current_trio_token(), callback)
    return lambda: _asyncio_soon(loop, callback)


def _asyncio_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(callback)


def _trio_soon(token: Any, callback: Callable[[], object]) -> Callable[[], None]:
    import trio

    def soon() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(callback)

    return soon
