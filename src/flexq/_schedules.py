"""Cron schedules: fire times across time zones and DST, misfire policies, and the firing loop.

The store keeps schedules and advances them; this module decides *when* they fire. Each firing
is one store transaction that moves ``next_fire_time`` on and inserts the jobs, guarded by the
schedule's revision, so that several processes sharing a store fire each time once.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import structlog
from croniter import CroniterBadDateError, croniter

from flexq._backoff import retry_pause
from flexq._errors import InvalidArguments
from flexq._models import ScheduleInfo, ScheduleState
from flexq._serialize import loads
from flexq._states import Kind
from flexq._store.base import NewJob, ScheduleFiring

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from flexq._models import JobId
    from flexq._store.base import ScheduleRecord, Store
    from flexq._task import Task

log = structlog.get_logger("flexq")

Misfire = Literal["skip", "run_once", "run_all"]
MISFIRE_POLICIES: tuple[Misfire, ...] = ("skip", "run_once", "run_all")
DEFAULT_MISFIRE: Misfire = "run_once"
MISFIRE_GRACE = 60.0
"""Seconds a fire time may be late and still count as on time (not missed) under ``skip``."""
RUN_ALL_LIMIT = 100
"""At most this many catch-up jobs per schedule and pass under ``run_all``."""
_LOOKAHEAD = 2 * 3600.0
"""How far ahead to look for the clock being set back (no zone sets it back by more)."""


class Cron:
    """A cron expression in a time zone: the instants at which it fires.

    Five fields (minute hour day month weekday), or six with seconds first (as the platform's
    cron expressions and Quartz have them). Fire times follow the zone's wall clock:

    - a wall time that a spring-forward day skips (02:30 when clocks jump from 02:00 to 03:00)
      fires once, at the end of the gap (03:00);
    - a wall time that a fall-back day repeats fires once, at its first occurrence, unless the
      hour field is ``*``: an every-hour expression follows real time and fires in both
      passes of the repeated hour (and not at all in a skipped hour).
    """

    def __init__(self, expression: str, timezone: str) -> None:
        if not isinstance(expression, str):
            raise InvalidArguments(f"a cron expression is a string, not {expression!r}")
        fields = expression.split()
        valid = len(fields) in (5, 6) and croniter.is_valid(
            expression, second_at_beginning=len(fields) == 6
        )
        if not valid:
            raise InvalidArguments(
                f"not a cron expression of 5 fields (minute hour day month weekday), or 6 with"
                f" seconds first: {expression!r}"
            )
        self.expression = " ".join(fields)
        self._seconds = len(fields) == 6
        self._every_hour = fields[-4] == "*"
        self.timezone = timezone
        self.zone = zone(timezone)

    def next_after(self, after: float) -> float | None:
        """The first fire time after ``after`` (epoch seconds), or None if there is none."""
        zone = self.zone
        # Whole seconds: fromtimestamp rounds to the microsecond, which may round up onto a
        # fire time that is after ``after``, and the walk below starts strictly after start.
        local = datetime.fromtimestamp(math.floor(after), zone)
        start = local.replace(tzinfo=None)
        offset = local.utcoffset()
        drop = offset - datetime.fromtimestamp(after + _LOOKAHEAD, zone).utcoffset()  # type: ignore[operator]
        if drop > timedelta(0) and (
            datetime.fromtimestamp(after + drop.total_seconds(), zone).utcoffset() != offset
        ):
            # The clock is set back within ``drop``: wall times earlier than now come again.
            start -= drop
        walls = croniter(self.expression, start, second_at_beginning=self._seconds)
        repeated: list[float] = []  # second passes of a repeated hour, in order
        while True:
            try:
                wall: datetime = walls.get_next(datetime)
            except CroniterBadDateError:
                return None
            instants = self._instants(wall)
            if not instants:
                continue
            while repeated and repeated[0] <= instants[0]:
                moment = repeated.pop(0)
                if moment > after:
                    return moment
            repeated.extend(instants[1:])
            if instants[0] > after:
                return instants[0]

    def _instants(self, wall: datetime) -> list[float]:
        """The instants at which the zone's clock shows ``wall``, as this cron counts them."""
        first = wall.replace(tzinfo=self.zone).timestamp()
        second = wall.replace(tzinfo=self.zone, fold=1).timestamp()
        if first == second:
            return [first]
        if first < second:  # the hour repeats: fold 1 is the second pass
            return [first, second] if self._every_hour else [first]
        # The clock skips this wall time: fold 0 reads it with the offset before the jump.
        return [] if self._every_hour else [self._gap_end(second, first)]

    def _gap_end(self, low: float, high: float) -> float:
        """The instant the clock jumps forward, between ``low`` and ``high``."""
        before = datetime.fromtimestamp(low, self.zone).utcoffset()
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.zone).utcoffset() == before:
                low = middle
            else:
                high = middle
        return high


def zone(timezone: str) -> ZoneInfo:
    """The zone of an IANA name, or raise InvalidArguments."""
    if not isinstance(timezone, str) or not timezone:
        raise InvalidArguments(f"timezone must be an IANA zone name, not {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArguments(f"unknown time zone {timezone!r}") from None


def check_misfire(misfire: object) -> Misfire:
    """The policy, or raise InvalidArguments."""
    for policy in MISFIRE_POLICIES:
        if misfire == policy:
            return policy
    raise InvalidArguments(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}: {misfire!r}")


class Plan(NamedTuple):
    """What one pass does with a due schedule."""

    fire_times: list[float]
    """One job for each of these."""
    next_fire_time: float | None


def plan(record: ScheduleRecord, now: float) -> Plan:
    """The jobs a due schedule gets now under its misfire policy, and its next fire time."""
    cron = Cron(record.cron, record.timezone)
    due = record.next_fire_time
    if due is None or due > now:
        return Plan([], due)
    if record.misfire == "run_all":
        times: list[float] = []
        moment: float | None = due
        while moment is not None and moment <= now and len(times) < RUN_ALL_LIMIT:
            times.append(moment)
            moment = cron.next_after(moment)
        return Plan(times, cron.next_after(now))
    if record.misfire == "run_once":
        return Plan([due], cron.next_after(now))
    on_time = due if due >= now - MISFIRE_GRACE else cron.next_after(now - MISFIRE_GRACE)
    fired = [on_time] if on_time is not None and on_time <= now else []
    return Plan(fired, cron.next_after(now))


def schedule_info(record: ScheduleRecord) -> ScheduleInfo:
    """The public snapshot of a stored schedule; times in the schedule's zone (in UTC on a
    host whose zone database lacks it)."""
    try:
        where: tzinfo = ZoneInfo(record.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        where = UTC

    def local(moment: float | None) -> datetime | None:
        return None if moment is None else datetime.fromtimestamp(moment, UTC).astimezone(where)

    return ScheduleInfo(
        name=record.name,
        tenant=record.tenant,
        cron=record.cron,
        timezone=record.timezone,
        task=record.task,
        args=tuple(loads(record.args)),
        kwargs=loads(record.kwargs),
        state=ScheduleState(record.state),
        misfire=record.misfire,
        reserve=record.reserve,
        previous_fire_time=local(record.previous_fire_time),
        next_fire_time=local(record.next_fire_time),
        times_triggered=record.times_triggered,
        last_job_id=record.last_job_id,
    )


class Scheduler:
    """The firing loop: enqueues the jobs of due schedules whose task this process has.

    It sleeps until the earliest next fire time, at most ``poll_interval`` (to see schedules
    that other processes add or change, and a clock that tests move).
    """

    def __init__(
        self,
        *,
        store: Store,
        tasks: Mapping[str, Task[object]],
        clock: Callable[[], float],
        poll_interval: float,
        new_id: Callable[[], JobId],
        on_fired: Callable[[list[NewJob], bool], None],
    ) -> None:
        self._store = store
        self._tasks = tasks
        self._clock = clock
        self._poll_interval = poll_interval
        self._new_id = new_id
        self._on_fired = on_fired
        self._wake = anyio.Event()

    def wake(self) -> None:
        """Look at the schedules again at once (one was added or changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Fire due schedules until cancelled."""
        pause = 0.0
        while True:
            try:
                next_time = await self.fire_due()
                pause = 0.0
            except Exception as exc:
                pause = retry_pause(pause, self._poll_interval)
                log.error("firing schedules failed, retrying", error=repr(exc), retry_in=pause)
                next_time = None
            wait = pause or self._poll_interval
            if next_time is not None:
                wait = min(wait, max(next_time - self._clock(), 0.0))
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._wake.wait()
            else:
                await anyio.lowlevel.checkpoint()
            self._wake = anyio.Event()

    async def fire_due(self) -> float | None:
        """One pass: fire every due schedule; return the earliest time to look again."""
        now = self._clock()
        due, next_time = await self._store.due_schedules(self._tasks.keys(), now)
        for record in due:
            task = self._tasks.get(record.task)
            if task is None:
                continue
            try:
                steps = plan(record, now)
            except InvalidArguments as exc:  # a zone this host's tz database lacks
                log.error("cannot fire schedule", schedule=record.name, error=str(exc))
                continue
            jobs = [self._job(record, task, moment) for moment in steps.fire_times]
            firing = ScheduleFiring(
                next_fire_time=steps.next_fire_time,
                previous_fire_time=steps.fire_times[-1] if steps.fire_times else None,
                last_job_id=jobs[-1].id if jobs else None,
            )
            if await self._store.fire_schedule(record.name, record.revision, firing, jobs, now):
                if jobs:
                    self._on_fired(jobs, record.reserve)
                later = steps.next_fire_time
            else:
                later = now  # changed by someone else meanwhile: read it again
            if later is not None and (next_time is None or later < next_time):
                next_time = later
        return next_time

    def _job(self, record: ScheduleRecord, task: Task[object], fire_time: float) -> NewJob:
        return NewJob(
            id=self._new_id(),
            task=task.name,
            kind=Kind.SCHEDULED,
            tenant=record.tenant,
            priority=task.priority,
            args=record.args,
            kwargs=record.kwargs,
            max_attempts=task.max_attempts,
            timeout=task.timeout,
            run_at=fire_time,
            key=None,
            parent_id=None,
        )
