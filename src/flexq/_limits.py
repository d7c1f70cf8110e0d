"""Per-tenant limits on batch jobs and child jobs, and how much of them a tenant uses."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from flexq._errors import InvalidArguments

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The platform limits a tenant's jobs obey.

    ``Queue(url, limits=Limits(...), tenant_limits={"acme": Limits(max_active_batches=10)})``
    sets them for every tenant and overrides them for some.
    """

    max_holding: int = 100
    """Batch jobs a tenant may have waiting in the holding queue (HOLDING)."""
    max_active_batches: int = 5
    """Batch jobs a tenant may have admitted at once (QUEUED, PREPARING or PROCESSING, and
    waiting to retry their ``start``)."""
    max_children_per_run: int = 50
    """Jobs one run of a handler may enqueue through its context."""
    max_callouts_per_run: int = 100
    """HTTP requests one run of a handler may make through ``ctx.http``."""

    def __post_init__(self) -> None:
        for name in (
            "max_holding", "max_active_batches", "max_children_per_run", "max_callouts_per_run",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArguments(f"{name} must be an int >= 0, not {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class LimitUsage:
    """A tenant's limits and how much of them its jobs use now."""

    tenant: str
    limits: Limits
    holding: int
    """Batch jobs in the holding queue."""
    active_batches: int
    """Batch jobs admitted to an active slot."""

    def __str__(self) -> str:
        return (
            f"{self.tenant}: holding {self.holding}/{self.limits.max_holding},"
            f" active {self.active_batches}/{self.limits.max_active_batches}"
        )


class LimitTable:
    """The limits of every tenant: one default and per-tenant overrides."""

    def __init__(
        self, default: Limits | None = None, overrides: Mapping[str, Limits] | None = None
    ):
        default = Limits() if default is None else default
        if not isinstance(default, Limits):
            raise InvalidArguments(f"limits must be a flexq.Limits, not {default!r}")
        for tenant, limits in (overrides or {}).items():
            if not isinstance(limits, Limits):
                raise InvalidArguments(f"tenant_limits[{tenant!r}] must be a flexq.Limits")
        self.default = default
        self.overrides = dict(overrides or {})

    def __call__(self, tenant: str) -> Limits:
        """The limits of ``tenant``."""
        return self.overrides.get(tenant, self.default)
