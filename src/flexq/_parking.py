"""Idle worker tasks, parked until there is work for them."""

from __future__ import annotations

import asyncio
from typing import Protocol

from flexq._cancellation import on_asyncio


class ParkingLot(Protocol):
    """Tasks parked until another task unparks them (trio's ``ParkingLot`` has this face)."""

    def __len__(self) -> int: ...

    async def park(self) -> None: ...

    def unpark(self, *, count: int) -> object: ...

    def unpark_all(self) -> object: ...


def parking_lot() -> ParkingLot:
    """A parking lot for the running event loop: a future per parked task under asyncio,
    trio's own under trio. A fresh event per wait, as anyio offers, costs about four times as
    much, and idle workers park once per job."""
    if on_asyncio():
        return _FutureLot()
    import trio

    return trio.lowlevel.ParkingLot()


class _FutureLot:
    __slots__ = ("_parked",)

    def __init__(self) -> None:
        self._parked: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._parked)

    async def park(self) -> None:
        parked = asyncio.get_running_loop().create_future()
        self._parked.append(parked)
        try:
            await parked
        except BaseException:
            if parked in self._parked:  # cancelled while parked
                self._parked.remove(parked)
            raise

    def unpark(self, *, count: int) -> None:
        """Wake ``count`` tasks (or all there are), the last parked first."""
        while count > 0 and self._parked:
            parked = self._parked.pop()
            if not parked.done():  # else cancelled, and its task not yet resumed to leave
                parked.set_result(None)
                count -= 1

    def unpark_all(self) -> None:
        self.unpark(count=len(self._parked))
