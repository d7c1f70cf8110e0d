"""Work that must run to its end, whatever cancels the task that awaits it."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Coroutine

T = TypeVar("T")


def on_asyncio() -> bool:
    """Whether the caller runs in an asyncio event loop (else: trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_running_to_the_end: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
"""The tasks :func:`to_the_end` made (a task it made, not those they start)."""


async def to_the_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end even if the caller is cancelled meanwhile; then return its
    result, or raise the caller's cancellation.

    Under trio an anyio shield is enough. Under asyncio it is not (``task.cancel()`` and
    ``asyncio.timeout`` go through it), so the coroutine runs as a task of its own, unless the
    caller is already such a task.
    """
    if not on_asyncio():
        with anyio.CancelScope(shield=True):
            return await coroutine
    if asyncio.current_task() in _running_to_the_end:
        return await coroutine  # nothing cancels this task: no task of its own needed
    task = asyncio.ensure_future(coroutine)
    _running_to_the_end.add(task)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait((task,))
            except asyncio.CancelledError as exc:
                cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # the caller's cancellation is what it gets
        raise cancelled
    return task.result()
