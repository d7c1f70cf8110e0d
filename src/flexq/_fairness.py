"""Deficit round robin: how many of the free workers each tenant with ready work gets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flexq._errors import InvalidArguments

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class DeficitRoundRobin:
    """Shares capacity between active tenants in proportion to their weights.

    When its turn comes, a tenant's weight is added to its deficit, and it gets as many jobs as
    the deficit holds whole units before the turn passes on. A tenant that runs out of ready
    work leaves the ring and loses its deficit, so idle time cannot be saved up and spent later
    as a burst.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, default_weight: float = 1.0):
        for tenant, weight in {**(weights or {}), "": default_weight}.items():
            if not (math.isfinite(weight) and weight >= 0.01):
                raise InvalidArguments(f"weight of tenant {tenant!r} must be >= 0.01, not {weight}")
        self._weights = dict(weights or {})
        self._default_weight = default_weight
        self._ring: list[str] = []
        self._deficit: dict[str, float] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._ring)

    @property
    def active(self) -> list[str]:
        """Tenants in the ring, in visiting order from the next one."""
        return self._ring[self._next :] + self._ring[: self._next]

    def weight(self, tenant: str) -> float:
        """The share weight of ``tenant``."""
        return self._weights.get(tenant, self._default_weight)

    def add(self, tenants: Iterable[str]) -> None:
        """Tenants that have ready work join the ring (at its end) unless they are in it."""
        for tenant in tenants:
            if tenant not in self._deficit:
                self._deficit[tenant] = 0.0
                self._ring.append(tenant)

    def discard(self, tenant: str) -> None:
        """A tenant with no more ready work leaves the ring."""
        if self._deficit.pop(tenant, None) is None:
            return
        index = self._ring.index(tenant)
        del self._ring[index]
        if index < self._next:
            self._next -= 1
        if self._next >= len(self._ring):
            self._next = 0

    def allocate(self, capacity: int) -> dict[str, int]:
        """Decide how many jobs each active tenant may start out of ``capacity``.

        The tenant whose turn it is keeps the turn until it has spent its deficit, across
        calls, so handing out one slot at a time gives the same shares as handing out many.
        """
        shares: dict[str, int] = {}
        capacity = self._turn(capacity, shares)
        if capacity > 0 and self._ring:
            capacity = self._whole_rounds(capacity, shares)
        while capacity > 0 and self._ring:
            capacity = self._turn(capacity, shares)
        return shares

    def _turn(self, capacity: int, shares: dict[str, int]) -> int:
        """Let the tenant whose turn it is take what its deficit holds; the capacity left."""
        if not self._ring:
            return capacity
        tenant = self._ring[self._next]
        if self._deficit[tenant] < 1:
            self._deficit[tenant] += self.weight(tenant)
        take = min(int(self._deficit[tenant]), capacity)
        if take:
            shares[tenant] = shares.get(tenant, 0) + take
            self._deficit[tenant] -= take
            capacity -= take
        if self._deficit[tenant] < 1:
            self._next = (self._next + 1) % len(self._ring)
        return capacity

    def _whole_rounds(self, capacity: int, shares: dict[str, int]) -> int:
        """Hand out as many whole rounds of turns at once as ``capacity`` holds, when every
        weight in the ring is whole: turn by turn, a claim of 256 slots for one tenant took
        256 turns. Called between turns, when no deficit is left (with whole weights, a turn
        spends all of it), so a round gives each tenant its weight, exactly as turn by turn.
        The capacity left."""
        ring = self.active
        weights = [self.weight(tenant) for tenant in ring]
        if not all(weight.is_integer() for weight in weights):
            return capacity
        size = int(sum(weights))
        rounds = capacity // size
        if rounds:
            for tenant, weight in zip(ring, weights, strict=True):
                shares[tenant] = shares.get(tenant, 0) + int(weight) * rounds
        return capacity - size * rounds
