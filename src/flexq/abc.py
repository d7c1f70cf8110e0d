"""Interfaces for pluggable parts: implement :class:`Store` to keep jobs somewhere new."""

from __future__ import annotations

from flexq._store.base import BatchCounts as BatchCounts
from flexq._store.base import ChunkDone as ChunkDone
from flexq._store.base import ClaimedJob as ClaimedJob
from flexq._store.base import DependentJob as DependentJob
from flexq._store.base import EnqueueResult as EnqueueResult
from flexq._store.base import EnqueueUnit as EnqueueUnit
from flexq._store.base import JobFilter as JobFilter
from flexq._store.base import NewJob as NewJob
from flexq._store.base import Outcome as Outcome
from flexq._store.base import Placement as Placement
from flexq._store.base import Recovered as Recovered
from flexq._store.base import Renewal as Renewal
from flexq._store.base import ScheduleFiring as ScheduleFiring
from flexq._store.base import ScheduleRecord as ScheduleRecord
from flexq._store.base import Store as Store
from flexq._store.base import WaitFacts as WaitFacts
from flexq._store.base import WorkerRecord as WorkerRecord

__all__ = [
    "BatchCounts",
    "ChunkDone",
    "ClaimedJob",
    "DependentJob",
    "EnqueueResult",
    "EnqueueUnit",
    "JobFilter",
    "NewJob",
    "Outcome",
    "Placement",
    "Recovered",
    "Renewal",
    "ScheduleFiring",
    "ScheduleRecord",
    "Store",
    "WaitFacts",
    "WorkerRecord",
]
