"""Group commit: many concurrent callers, one store round trip."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(slots=True, eq=False)
class _Waiter(Generic[T, R]):
    item: T
    wake: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    finished: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Coalesces the items of concurrent :meth:`submit` calls into one ``flush`` call.

    The first caller becomes the leader and flushes; callers that arrive meanwhile wait and are
    flushed together in the next round. ``flush`` returns one result per item, in order. A leader
    whose own item is written hands the lead to the next waiter, so no caller flushes forever
    for others. Flushes run shielded from cancellation: a batch is never left half-reported.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._flush = flush
        self._pending: list[_Waiter[T, R]] = []
        self._leading = False

    async def submit(self, item: T) -> R:
        """Write ``item`` with whatever else is pending; return its result once durable."""
        waiter: _Waiter[T, R] = _Waiter(item)
        self._pending.append(waiter)
        if self._leading:
            with anyio.CancelScope(shield=True):
                await waiter.wake.wait()
        if not waiter.finished:
            await self._lead(waiter)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    async def _lead(self, own: _Waiter[T, R]) -> None:
        self._leading = True
        try:
            with anyio.CancelScope(shield=True):
                while not own.finished:
                    batch, self._pending = self._pending, []
                    await self._flush_batch(batch)
        finally:
            if self._pending:
                self._pending[0].wake.set()
            else:
                self._leading = False

    async def _flush_batch(self, batch: list[_Waiter[T, R]]) -> None:
        try:
            results = await self._flush([waiter.item for waiter in batch])
        except Exception as exc:
            for waiter in batch:
                waiter.error = exc
                waiter.finished = True
                waiter.wake.set()
            return
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result
            waiter.finished = True
            waiter.wake.set()
