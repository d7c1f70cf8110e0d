"""Callouts: how many HTTP requests a job's run makes through ``ctx.http``, and how many it may."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

from flexq._errors import LimitExceeded

if TYPE_CHECKING:
    from flexq._store.base import ClaimedJob


class CalloutTally:
    """The requests one attempt of a job made through ``ctx.http``, up to ``limit``."""

    __slots__ = ("count", "job", "limit")

    def __init__(self, job: ClaimedJob, limit: int) -> None:
        self.job = job
        self.limit = limit
        self.count = 0

    def take(self, method: str, url: str) -> None:
        """Count one more request, or raise LimitExceeded if the run made ``limit`` already."""
        if self.count >= self.limit:
            raise LimitExceeded(
                f"a run of {self.job.task!r} may make at most {self.limit} callouts"
                f" (max_callouts_per_run of tenant {self.job.tenant!r}); {method} {url} was"
                " not sent"
            )
        self.count += 1


current_tally: contextvars.ContextVar[CalloutTally | None] = contextvars.ContextVar(
    "flexq_callout_tally", default=None
)
"""The tally of the job whose handler runs in this context (tasks it starts inherit it)."""
