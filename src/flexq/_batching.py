"""Group commit: many concurrent callers, one store round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from flexq._cancellation import to_the_end
from flexq._errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    __slots__ = ("done", "error", "items", "lead", "results")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.results: list[R] = []
        self.error: BaseException | None = None
        self.done = anyio.Event()
        self.lead = anyio.Event()


class GroupCommit(Generic[T, R]):
    """Coalesces the items of concurrent :meth:`submit` calls into one ``flush`` call.

    Items that arrive while a flush runs gather in the next batch. The first caller of a batch
    flushes it once the previous flush is over; the others wait for it. Every caller thus
    flushes at most its own batch, and a batch is one ``flush(items)`` that returns one result
    per item, in order. A batch's leader waits for its turn and flushes shielded from every
    cancellation, asyncio's own included (:func:`~flexq._cancellation.to_the_end`): a batch is
    never left half-written nor unwritten while others wait for it, and a cancelled caller's
    item may still be written.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._flush = flush
        self._open: _Batch[T, R] | None = None
        self._flushing = False

    async def submit(self, item: T) -> R:
        """Write ``item`` with whatever else is pending; return its result once durable."""
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
        index = len(batch.items)
        batch.items.append(item)
        if index:
            await batch.done.wait()
        else:
            await to_the_end(self._lead(batch))
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    async def _lead(self, batch: _Batch[T, R]) -> None:
        """Flush ``batch`` once the flush before it is over."""
        if self._flushing:
            await batch.lead.wait()
        self._flushing = True
        self._open = None
        try:
            batch.results = await self._flush(batch.items)
        except Exception as exc:
            batch.error = exc
        except BaseException as exc:
            batch.error = StoreError(f"the write was interrupted ({exc!r}): it may have happened")
            raise
        finally:
            batch.done.set()
            successor = self._open
            if successor is None:
                self._flushing = False
            else:
                successor.lead.set()
