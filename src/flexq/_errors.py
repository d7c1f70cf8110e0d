"""The exceptions flexq raises; every one derives from :class:`FlexqError`."""

from __future__ import annotations


class FlexqError(Exception):
    """Base class of every error flexq raises."""


class UnknownTask(FlexqError):
    """The task name is not registered with this queue."""


class InvalidArguments(FlexqError):
    """Arguments or options of a call are not acceptable (not JSON, wrong signature...)."""


class JobNotFound(FlexqError, LookupError):
    """No job has this id (it never existed, or retention pruned it)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} (never enqueued, or pruned after retention)")
        self.job_id = job_id


class IllegalTransition(FlexqError):
    """A job was asked to move between two states that the transition table does not link."""

    def __init__(self, job_id: str | None, source: str, target: str) -> None:
        who = f"job {job_id!r}" if job_id else "a job"
        super().__init__(f"{who} cannot go from {source} to {target}")
        self.job_id = job_id
        self.source = source
        self.target = target


class DuplicateJob(FlexqError):
    """A job with the same ``key`` and tenant is not final yet.

    ``existing_id`` is the id of that job.
    """

    def __init__(self, tenant: str, key: str, existing_id: str) -> None:
        super().__init__(
            f"tenant {tenant!r} already has an unfinished job with key {key!r} "
            f"(id {existing_id!r}); pass on_duplicate='return' to get its id instead"
        )
        self.tenant = tenant
        self.key = key
        self.existing_id = existing_id


class StoreError(FlexqError):
    """The store failed (database unreachable, locked too long, disk full...).

    The call had no effect: its transaction was rolled back. ``__cause__`` holds the driver's
    exception.
    """


class LimitExceeded(FlexqError):
    """A configured limit would be exceeded; nothing was written."""


class CalloutFailed(FlexqError):
    """A request through ``ctx.http`` timed out, could not be sent, or got a 5xx response.

    It fails the attempt, which follows the task's retry policy. ``status`` is None when no
    response came.
    """

    def __init__(self, method: str, url: str, status: int | None, reason: str) -> None:
        super().__init__(f"callout {method} {url} {reason}")
        self.method = method
        self.url = url
        self.status = status


class QueueClosed(FlexqError):
    """The queue is not open: use ``async with queue:`` or ``await queue.open()`` first."""


class JobTimeout(FlexqError, TimeoutError):
    """A job attempt ran longer than its task's ``timeout``; recorded as the attempt's error."""


class WaitTimeout(FlexqError, TimeoutError):
    """:meth:`flexq.Queue.wait` gave up before the job reached a final state."""


class NotHolding(FlexqError):
    """A holding-queue operation named a job that is not in the holding queue (HOLDING)."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(
            f"job {job_id!r} is {state}, not HOLDING: only jobs in the holding queue can be"
            " reordered"
        )
        self.job_id = job_id
        self.state = state


class SchemaVersionError(FlexqError):
    """The store's schema is not at the version this flexq uses, and flexq will not use it.

    Either the schema is newer (made by a newer flexq: upgrade flexq), or it is older or
    missing and the queue was made with ``migrate=False`` (run ``flexq migrate``). ``found``
    is the schema's version (0: no schema), ``expected`` this flexq's.
    """

    def __init__(self, where: str, found: int, expected: int) -> None:
        if found > expected:
            message = (
                f"{where} has flexq schema version {found}, newer than this flexq understands"
                f" ({expected}): upgrade flexq"
            )
        else:
            state = "has no flexq schema" if found == 0 else f"is at flexq schema version {found}"
            message = (
                f"{where} {state}, this flexq needs version {expected}: run `flexq migrate`"
                " (or open the queue with migrate=True)"
            )
        super().__init__(message)
        self.where = where
        self.found = found
        self.expected = expected


class NotRetried(Exception):
    """Wraps an error that another attempt cannot mend (a result that is not JSON, a batch's
    ``finish`` that raised): the job fails at once. Internal to flexq."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class ScheduleNotFound(FlexqError, LookupError):
    """No schedule has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")
        self.name = name


def qualified_name(cls: type) -> str:
    """The name an error record gives an exception type: flexq's own by their public name."""
    module = cls.__module__
    if module.startswith("flexq."):
        module = "flexq"
    return f"{module}.{cls.__qualname__}"
