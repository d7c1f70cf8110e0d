"""flexq: a durable, fair, asyncio- and trio-native job queue that runs in your event loop."""

from __future__ import annotations

from flexq._backoff import Backoff as Backoff
from flexq._batch import BatchContext as BatchContext
from flexq._batch import BatchSummary as BatchSummary
from flexq._batch import ChunkError as ChunkError
from flexq._context import Context as Context
from flexq._errors import CalloutFailed as CalloutFailed
from flexq._errors import DuplicateJob as DuplicateJob
from flexq._errors import FlexqError as FlexqError
from flexq._errors import IllegalTransition as IllegalTransition
from flexq._errors import InvalidArguments as InvalidArguments
from flexq._errors import JobNotFound as JobNotFound
from flexq._errors import JobTimeout as JobTimeout
from flexq._errors import LimitExceeded as LimitExceeded
from flexq._errors import NotHolding as NotHolding
from flexq._errors import QueueClosed as QueueClosed
from flexq._errors import ScheduleNotFound as ScheduleNotFound
from flexq._errors import SchemaVersionError as SchemaVersionError
from flexq._errors import StoreError as StoreError
from flexq._errors import UnknownTask as UnknownTask
from flexq._errors import WaitTimeout as WaitTimeout
from flexq._explain import Explanation as Explanation
from flexq._explain import WaitReason as WaitReason
from flexq._explain import Why as Why
from flexq._flex import FlexQueue as FlexQueue
from flexq._limits import Limits as Limits
from flexq._limits import LimitUsage as LimitUsage
from flexq._models import JSON as JSON
from flexq._models import BatchProgress as BatchProgress
from flexq._models import Call as Call
from flexq._models import JobError as JobError
from flexq._models import JobId as JobId
from flexq._models import JobInfo as JobInfo
from flexq._models import Page as Page
from flexq._models import Pause as Pause
from flexq._models import PauseScope as PauseScope
from flexq._models import QueueStatistics as QueueStatistics
from flexq._models import ScheduleInfo as ScheduleInfo
from flexq._models import ScheduleState as ScheduleState
from flexq._models import WorkerInfo as WorkerInfo
from flexq._queue import Queue as Queue
from flexq._states import TRANSITIONS as TRANSITIONS
from flexq._states import Kind as Kind
from flexq._states import State as State
from flexq._task import Task as Task

__all__ = [
    "JSON",
    "TRANSITIONS",
    "Backoff",
    "BatchContext",
    "BatchProgress",
    "BatchSummary",
    "Call",
    "CalloutFailed",
    "ChunkError",
    "Context",
    "DuplicateJob",
    "Explanation",
    "FlexQueue",
    "FlexqError",
    "IllegalTransition",
    "InvalidArguments",
    "JobError",
    "JobId",
    "JobInfo",
    "JobNotFound",
    "JobTimeout",
    "Kind",
    "LimitExceeded",
    "LimitUsage",
    "Limits",
    "NotHolding",
    "Page",
    "Pause",
    "PauseScope",
    "Queue",
    "QueueClosed",
    "QueueStatistics",
    "ScheduleInfo",
    "ScheduleNotFound",
    "ScheduleState",
    "SchemaVersionError",
    "State",
    "StoreError",
    "Task",
    "UnknownTask",
    "WaitReason",
    "WaitTimeout",
    "Why",
    "WorkerInfo",
]
