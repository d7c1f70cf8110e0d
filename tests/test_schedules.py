"""Cron schedules: fire times across DST, misfire policies, control, and firing once per time."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

import flexq
from flexq._schedules import Cron
from flexq._store.memory import MemoryStore
from flexq._store.sqlite import _SCHEMA as sqlite_schema
from flexq._store.sqlite import SCHEMA_VERSION
from flexq.abc import NewJob, ScheduleFiring, ScheduleRecord

from .conftest import postgres_url

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from flexq.abc import Store

MADRID = ZoneInfo("Europe/Madrid")
START = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)


class Clock:
    """A clock that tests move by hand."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta).total_seconds()


def fire_times(expression: str, timezone: str, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire times after ``start``, in the schedule's zone."""
    cron, zone = Cron(expression, timezone), ZoneInfo(timezone)
    moment, times = start.timestamp(), []
    for _ in range(count):
        found = cron.next_after(moment)
        assert found is not None
        times.append(datetime.fromtimestamp(found, zone))
        moment = found
    return times


def local(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=MADRID, fold=fold)


def test_a_skipped_wall_time_fires_once_at_the_end_of_the_gap() -> None:
    """On a spring-forward day (02:00 -> 03:00) a 02:30 job runs once, at 03:00."""
    times = fire_times("30 2 * * *", "Europe/Madrid", local(2026, 3, 28, 12), 3)
    assert times == [local(2026, 3, 29, 3, 0), local(2026, 3, 30, 2, 30), local(2026, 3, 31, 2, 30)]


def test_a_repeated_wall_time_fires_once() -> None:
    """On a fall-back day (03:00 -> 02:00) a 02:30 job runs once, at the first 02:30."""
    times = fire_times("30 2 * * *", "Europe/Madrid", local(2026, 10, 24, 12), 2)
    assert times == [local(2026, 10, 25, 2, 30, fold=0), local(2026, 10, 26, 2, 30)]
    assert times[1].timestamp() - times[0].timestamp() == 25 * 3600


def test_an_every_hour_expression_follows_real_time_across_dst() -> None:
    """An hourly job runs in both passes of a repeated hour and not in a skipped one."""
    autumn = fire_times("30 * * * *", "Europe/Madrid", local(2026, 10, 25, 1, 0), 3)
    assert [t.astimezone(UTC).hour for t in autumn] == [23, 0, 1]  # 01:30, 02:30, 02:30 again
    assert autumn[2] == local(2026, 10, 25, 2, 30, fold=1)
    spring = fire_times("30 * * * *", "Europe/Madrid", local(2026, 3, 29, 1, 0), 2)
    assert spring == [local(2026, 3, 29, 1, 30), local(2026, 3, 29, 3, 30)]


def test_six_fields_put_seconds_first() -> None:
    """A sixth field makes the first one seconds."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    times = fire_times("*/20 * * * * *", "UTC", start, 3)
    assert [t - start for t in times] == [timedelta(seconds=s) for s in (20, 40, 60)]


def test_an_impossible_date_has_no_fire_time() -> None:
    """February 30 never comes."""
    assert Cron("0 0 30 2 *", "UTC").next_after(START.timestamp()) is None


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds (the firing loop runs on its own)."""
    with anyio.fail_after(timeout):
        # The firing loop is another task writing to the store: there is no event to wait on.
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def scheduled_jobs(queue: flexq.Queue) -> list[flexq.JobInfo]:
    return list((await queue.jobs(kind="scheduled", limit=1000)).items)


async def advance_and_settle(queue: flexq.Queue, clock: Clock, name: str, **delta: float) -> None:
    """Move the clock on and wait until the firing loop has dealt with the schedule."""
    clock.advance(**delta)

    async def settled() -> bool:
        info = await queue.get_schedule(name)
        return info.next_fire_time is None or info.next_fire_time.timestamp() > clock.now

    await wait_until(settled)


def hourly_queue(url: str | Store, clock: Clock) -> tuple[flexq.Queue, Any]:
    queue = flexq.Queue(url, workers=4, poll_interval=0.05, max_loop_lag=None, clock=clock)

    @queue.task(name="report")
    async def report(region: str) -> str:
        return region

    return queue, report


async def test_a_schedule_enqueues_one_scheduled_job_per_fire_time(queue_url: str) -> None:
    """At its fire time the schedule enqueues a job of kind scheduled, which runs."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        info = await queue.schedule("hourly", "0 * * * *", report, "eu", tenant="acme")
        assert info.next_fire_time == datetime(2026, 1, 1, 1, tzinfo=UTC)
        assert (info.state, info.times_triggered, info.last_job_id) == ("active", 0, None)
        await advance_and_settle(queue, clock, "hourly", minutes=30, seconds=1)
        (job,) = await scheduled_jobs(queue)
        done = await queue.wait(job.id, timeout=10)
        info = await queue.get_schedule("hourly")
    assert (done.state, done.result, done.tenant, done.kind) == (
        "COMPLETED",
        "eu",
        "acme",
        "scheduled",
    )
    assert done.run_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert (info.times_triggered, info.last_job_id) == (1, job.id)
    assert info.previous_fire_time == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert info.next_fire_time == datetime(2026, 1, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("misfire", "run_ats"),
    [
        ("run_all", [1, 2, 3, 4, 5]),
        ("run_once", [1]),
        ("skip", []),
    ],
)
async def test_misfire_policies_after_downtime(
    queue_url: str, misfire: str, run_ats: list[int]
) -> None:
    """Five fire times missed: run_all catches up each, run_once one, skip none."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu", misfire=misfire)  # type: ignore[arg-type]
        await advance_and_settle(queue, clock, "hourly", hours=5)
        jobs = await scheduled_jobs(queue)
        info = await queue.get_schedule("hourly")
    assert sorted(job.run_at.hour for job in jobs) == run_ats
    assert info.times_triggered == len(run_ats)
    assert info.next_fire_time == datetime(2026, 1, 1, 6, tzinfo=UTC)


async def test_skip_still_runs_a_fire_time_that_is_only_a_little_late(queue_url: str) -> None:
    """Under skip, a fire time less than a minute late is on time, not missed."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu", misfire="skip")
        await advance_and_settle(queue, clock, "hourly", minutes=30, seconds=30)
        jobs = await scheduled_jobs(queue)
    assert [job.run_at.hour for job in jobs] == [1]


async def test_run_all_is_bounded(queue_url: str) -> None:
    """A long outage enqueues at most 100 catch-up jobs."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu", misfire="run_all")
        await queue.pause(task=report)
        await advance_and_settle(queue, clock, "hourly", days=30)
        counts = await queue.counts(kind="scheduled")
    assert sum(counts.values()) == 100


async def test_pause_and_resume(queue_url: str) -> None:
    """A paused schedule does not fire; resumed, it fires from its next time, no catch-up."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu", misfire="run_all")
        paused = await queue.pause_schedule("hourly")
        assert paused.state is flexq.ScheduleState.PAUSED
        clock.advance(hours=3)
        resumed = await queue.resume_schedule("hourly")
        assert resumed.state is flexq.ScheduleState.ACTIVE
        assert resumed.next_fire_time == datetime(2026, 1, 1, 4, tzinfo=UTC)
        assert await scheduled_jobs(queue) == []
        await advance_and_settle(queue, clock, "hourly", hours=1)
        jobs = await scheduled_jobs(queue)
    assert [job.run_at.hour for job in jobs] == [4]


async def test_schedule_again_updates_in_place(queue_url: str) -> None:
    """The same name updates the schedule: arguments change, the count stays one, and the
    next fire time is kept unless the expression changes."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        first = await queue.schedule("nightly", "0 2 * * *", report, "eu", tenant="acme")
        clock.advance(minutes=10)
        await queue.pause_schedule("nightly")
        second = await queue.schedule("nightly", "0 2 * * *", report, "us", tenant="acme")
        third = await queue.schedule("nightly", "0 3 * * *", report, "us", tenant="acme")
        listed = await queue.schedules(tenant="acme")
        assert await queue.schedules(tenant="other") == []
    assert second.args == ("us",)
    assert second.next_fire_time == first.next_fire_time
    assert second.state is flexq.ScheduleState.PAUSED
    assert third.next_fire_time == datetime(2026, 1, 1, 3, tzinfo=UTC)
    assert listed == [third]


async def test_timezones_and_dst_through_the_queue(queue_url: str) -> None:
    """A Madrid schedule fires at Madrid's 02:30, and once at 03:00 on spring-forward day."""
    clock = Clock(datetime(2026, 3, 28, 12, tzinfo=MADRID))
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        info = await queue.schedule(
            "madrid", "30 2 * * *", report, "eu", timezone="Europe/Madrid", misfire="run_all"
        )
        assert info.next_fire_time == datetime(2026, 3, 29, 3, 0, tzinfo=MADRID)
        assert info.next_fire_time.tzinfo == MADRID
        await advance_and_settle(queue, clock, "madrid", days=2)
        jobs = await scheduled_jobs(queue)
    assert sorted(job.run_at for job in jobs) == [
        datetime(2026, 3, 29, 3, 0, tzinfo=MADRID),
        datetime(2026, 3, 30, 2, 30, tzinfo=MADRID),
    ]


async def test_a_fall_back_day_fires_once_through_the_queue(queue_url: str) -> None:
    """Across the night Madrid repeats 02:00-03:00, a 02:30 schedule enqueues one job."""
    clock = Clock(datetime(2026, 10, 24, 12, tzinfo=MADRID))
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule(
            "madrid", "30 2 * * *", report, "eu", timezone="Europe/Madrid", misfire="run_all"
        )
        for _ in range(8):  # through the night in steps, the firing loop runs in between
            await advance_and_settle(queue, clock, "madrid", hours=2)
        await advance_and_settle(queue, clock, "madrid", hours=24)
        jobs = await scheduled_jobs(queue)
    # Compared as instants: an aware time in a repeated hour never equals one of another zone.
    assert sorted(job.run_at.timestamp() for job in jobs) == [
        datetime(2026, 10, 25, 2, 30, tzinfo=MADRID).timestamp(),
        datetime(2026, 10, 26, 2, 30, tzinfo=MADRID).timestamp(),
    ]


async def test_a_restarted_queue_picks_up_its_schedules(tmp_path: Path) -> None:
    """Schedules outlive the process: a new queue on the same store fires the missed time."""
    clock = Clock()
    for url in (f"sqlite:///{tmp_path / 'flexq.db'}", MemoryStore()):
        writer, report = hourly_queue(url, clock)
        await writer.open()
        await writer.schedule("hourly", "0 * * * *", report, "eu")
        await writer.close()
        clock.advance(hours=1)
        reader, _ = hourly_queue(url, clock)
        async with reader:
            await advance_and_settle(reader, clock, "hourly", seconds=0)
            jobs = await scheduled_jobs(reader)
        assert [job.run_at for job in jobs] == [datetime(2026, 1, 1, 1, tzinfo=UTC)]
        clock.now = START.timestamp()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_two_queues_on_one_database_fire_each_time_once(
    database: str, request: pytest.FixtureRequest
) -> None:
    """Two processes' firing loops (on one SQLite file, or one PostgreSQL schema) race for
    every fire time; each time gets one job."""
    if database == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
    else:
        url = postgres_url(request.getfixturevalue("pg_schema"))
    clock = Clock()
    first, report = hourly_queue(url, clock)
    second, _ = hourly_queue(url, clock)
    async with first, second:
        await first.schedule("every-minute", "* * * * *", report, "eu", misfire="run_all")
        for _ in range(20):
            clock.advance(minutes=1)
            await anyio.sleep(0.02)
        await advance_and_settle(first, clock, "every-minute", seconds=0)
        jobs = await scheduled_jobs(first)
        info = await second.get_schedule("every-minute")
    run_ats = [job.run_at for job in jobs]
    assert len(run_ats) == len(set(run_ats)) == 20
    assert info.times_triggered == 20


async def test_bad_schedules_are_rejected_with_nothing_written(queue_url: str) -> None:
    """Invalid expressions, zones, policies, names and arguments raise at the call."""
    queue, report = hourly_queue(queue_url, Clock())

    @queue.task
    async def nothing() -> None:
        pass

    async with queue:
        bad_calls: list[Callable[[], Awaitable[flexq.ScheduleInfo]]] = [
            lambda: queue.schedule("s", "61 * * * *", report, "eu"),
            lambda: queue.schedule("s", "* * * *", report, "eu"),
            lambda: queue.schedule("s", "0 0 * * * * 2026", report, "eu"),
            lambda: queue.schedule("s", "0 0 30 2 *", report, "eu"),
            lambda: queue.schedule("s", "0 * * * *", report, "eu", timezone="Mars/Olympus"),
            lambda: queue.schedule("s", "0 * * * *", report, "eu", timezone=""),
            lambda: queue.schedule("s", "0 * * * *", report, "eu", misfire="twice"),  # type: ignore[arg-type]
            lambda: queue.schedule("", "0 * * * *", report, "eu"),
            lambda: queue.schedule("s", "0 * * * *", report),
            lambda: queue.schedule("s", "0 * * * *", report, {1, 2}),
            lambda: queue.schedule("s", "0 * * * *", nothing, tenant=""),
        ]
        for call in bad_calls:
            with pytest.raises(flexq.InvalidArguments):
                await call()
        with pytest.raises(flexq.UnknownTask):
            await queue.schedule("s", "0 * * * *", "unregistered")
        with pytest.raises(flexq.ScheduleNotFound):
            await queue.pause_schedule("s")
        with pytest.raises(flexq.ScheduleNotFound):
            await queue.get_schedule("s")
        assert await queue.schedules() == []


async def test_unschedule_removes_the_schedule(queue_url: str) -> None:
    """An unscheduled name is gone and fires no more."""
    clock = Clock()
    queue, report = hourly_queue(queue_url, clock)
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu")
        assert await queue.unschedule("hourly")
        assert not await queue.unschedule("hourly")
        assert await queue.schedules() == []


async def test_a_reserved_schedule_starts_on_time_in_a_saturated_queue(queue_url: str) -> None:
    """With every worker busy and the host throttled, a reserve=True job still starts at once,
    on the reserved worker, while the other jobs keep waiting."""
    clock = Clock()
    busy = False
    queue = flexq.Queue(
        queue_url, workers=2, poll_interval=0.05, max_loop_lag=None, clock=clock,
        load_probe=lambda: busy,
    )  # fmt: skip
    release = anyio.Event()

    @queue.task
    async def hog() -> None:
        await release.wait()

    @queue.task(name="report")
    async def report(region: str) -> str:
        return region

    async with queue:
        hogs = [await queue.enqueue(hog, tenant=f"t{n % 2}") for n in range(6)]
        await wait_until(lambda: _running(queue, 2))
        busy = True
        info = await queue.schedule("urgent", "0 * * * *", report, "eu", reserve=True)
        assert info.reserve
        await advance_and_settle(queue, clock, "urgent", minutes=30)
        (job,) = await scheduled_jobs(queue)
        done = await queue.wait(job.id, timeout=10)
        counts = await queue.counts()
        busy = False
        release.set()
        for hog_id in hogs:
            await queue.wait(hog_id, timeout=10)
    assert done.state is flexq.State.COMPLETED
    assert (counts[flexq.State.PROCESSING], counts[flexq.State.QUEUED]) == (2, 4)


async def _running(queue: flexq.Queue, count: int) -> bool:
    return (await queue.counts())[flexq.State.PROCESSING] == count


def test_reserved_workers_must_be_a_count() -> None:
    """A negative number of reserved workers is refused."""
    with pytest.raises(flexq.InvalidArguments):
        flexq.Queue("memory://", reserved_workers=-1)


# -- the store ------------------------------------------------------------------------------


def record(
    name: str = "s", *, task: str = "t", cron: str = "0 * * * *", at: float = 100.0
) -> ScheduleRecord:
    return ScheduleRecord(
        name=name, tenant="acme", cron=cron, timezone="UTC", task=task, args="[1]",
        kwargs="{}", misfire="run_once", reserve=False, state="active", next_fire_time=at,
    )  # fmt: skip


def scheduled_job(job_id: str, run_at: float) -> NewJob:
    return NewJob(
        id=job_id, task="t", kind=flexq.Kind.SCHEDULED, tenant="acme", priority=0, args="[1]",
        kwargs="{}", max_attempts=1, timeout=None, run_at=run_at, key=None, parent_id=None,
    )  # fmt: skip


async def test_a_firing_is_guarded_by_the_revision(store: Store) -> None:
    """Only a firing of the latest revision writes; a second one with the same revision, as
    a process that lost the race sends, writes neither the schedule nor a job."""
    stored = await store.put_schedule(record(), 50.0)
    firing = ScheduleFiring(next_fire_time=200.0, previous_fire_time=100.0, last_job_id="j1")
    assert await store.fire_schedule(
        "s", stored.revision, firing, [scheduled_job("j1", 100.0)], 150.0
    )
    late = ScheduleFiring(next_fire_time=200.0, previous_fire_time=100.0, last_job_id="j2")
    assert not await store.fire_schedule(
        "s", stored.revision, late, [scheduled_job("j2", 100.0)], 150.0
    )
    after = await store.get_schedule("s")
    assert after is not None
    assert (after.next_fire_time, after.previous_fire_time) == (200.0, 100.0)
    assert (after.times_triggered, after.last_job_id) == (1, "j1")
    assert [info.id for info in await store.get_many(["j1", "j2"])] == ["j1"]
    assert (await store.get("j1")).state is flexq.State.QUEUED


async def test_put_schedule_keeps_history_and_times_unless_the_expression_changes(
    store: Store,
) -> None:
    """An update bumps the revision and keeps counters; only a new expression moves the time."""
    first = await store.put_schedule(record(), 50.0)
    firing = ScheduleFiring(next_fire_time=200.0, previous_fire_time=100.0, last_job_id="j1")
    await store.fire_schedule("s", first.revision, firing, [scheduled_job("j1", 100.0)], 150.0)
    same = await store.put_schedule(record(at=999.0)._replace(args="[2]"), 160.0)
    assert (same.next_fire_time, same.times_triggered, same.args) == (200.0, 1, "[2]")
    assert same.revision > first.revision
    moved = await store.put_schedule(record(cron="30 * * * *", at=999.0), 170.0)
    assert (moved.next_fire_time, moved.last_job_id, moved.created_at) == (999.0, "j1", 50.0)
    assert await store.set_schedule_state("s", same.revision, "paused", None) is None
    paused = await store.set_schedule_state("s", moved.revision, "paused", 999.0)
    assert paused is not None
    assert paused.state == "paused"


async def test_due_schedules_are_active_ones_of_the_given_tasks(store: Store) -> None:
    """Due lists active schedules of runnable tasks; the next time counts the later ones."""
    await store.put_schedule(record("due", at=100.0), 0.0)
    await store.put_schedule(record("other-task", task="u", at=100.0), 0.0)
    later = await store.put_schedule(record("later", at=300.0), 0.0)
    paused = await store.put_schedule(record("paused", at=100.0), 0.0)
    await store.set_schedule_state("paused", paused.revision, "paused", 100.0)
    due, next_time = await store.due_schedules({"t"}, 150.0)
    assert [r.name for r in due] == ["due"]
    assert next_time == later.next_fire_time
    assert [r.name for r in await store.list_schedules("acme")] == [
        "due", "later", "other-task", "paused",
    ]  # fmt: skip
    assert await store.delete_schedule("due")
    assert await store.get_schedule("due") is None


async def test_a_database_from_before_schedules_gains_their_tables(tmp_path: Path) -> None:
    """A SQLite file made without the schedule and dependency tables gets them when opened."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    added = ("flexq_schedules", "flexq_dependencies")  # the tables schedules and chains added
    for statement in sqlite_schema.split(";"):
        if statement.strip() and not any(table in statement for table in added):
            old.execute(statement)
    old.execute("INSERT INTO flexq_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    old.commit()
    old.close()
    queue, report = hourly_queue(f"sqlite:///{path}", Clock())
    async with queue:
        await queue.schedule("hourly", "0 * * * *", report, "eu")
        first = await queue.enqueue(report, "a")
        await queue.enqueue(report, "b", depends_on=[first])
        assert [info.name for info in await queue.schedules()] == ["hourly"]


def wall_offset(moment: float, zone: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(moment, zone).utcoffset()


EXPRESSIONS = [
    "*/7 * * * *", "30 2 * * *", "0,45 1-3 * * *", "15 * * * *", "0 0 * * 0",
    "*/20 * * * * *", "10 30 2 * * *", "0 12 1 * *",
]  # fmt: skip
ZONES = ["UTC", "Europe/Madrid", "America/New_York", "Australia/Lord_Howe", "Asia/Tehran"]


@functools.cache
def clock_changes(timezone: str, year: int) -> list[float]:
    """The instants (to the hour) at which the zone's offset changes in ``year``."""
    zone = ZoneInfo(timezone)
    start = datetime(year, 1, 1, tzinfo=UTC).timestamp()
    hours = [start + 3600 * n for n in range(366 * 24)]
    return [b for a, b in itertools.pairwise(hours) if wall_offset(a, zone) != wall_offset(b, zone)]


@st.composite
def instants(draw: st.DrawFn, timezone: str) -> float:
    """Any instant of 2025-2027, or one within four hours of a change of the zone's clock."""
    changes = clock_changes(timezone, 2026)
    near_a_change = draw(st.booleans())
    if changes and near_a_change:
        instant = draw(st.sampled_from(changes)) + draw(st.floats(-4 * 3600, 4 * 3600))
    else:
        low, high = datetime(2025, 1, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC)
        instant = draw(st.floats(low.timestamp(), high.timestamp()))
    # Whole microseconds: croniter, the oracle, starts from a datetime, which rounds to them.
    return round(instant, 6)


@settings(max_examples=300, deadline=None)
@given(
    expression=st.sampled_from(EXPRESSIONS),
    zone_and_after=st.sampled_from(ZONES).flatmap(
        lambda timezone: st.tuples(st.just(timezone), instants(timezone))
    ),
)
def test_fire_times_rise_and_match_the_wall_clock(
    expression: str, zone_and_after: tuple[str, float]
) -> None:
    """Fire times only rise, and each shows a wall time the expression names (or ends a gap
    that skipped one); an every-hour expression misses no instant that shows such a time; in
    UTC they are exactly croniter's."""
    timezone, after = zone_and_after
    cron, zone = Cron(expression, timezone), ZoneInfo(timezone)
    seconds = len(expression.split()) == 6
    walls = croniter(expression, datetime.fromtimestamp(after, UTC).replace(tzinfo=None),
                     second_at_beginning=seconds)  # fmt: skip
    moment = after
    for _ in range(5):
        found = cron.next_after(moment)
        assert found is not None
        assert found > moment
        wall = datetime.fromtimestamp(found, zone).replace(tzinfo=None)
        gap_end = datetime.fromtimestamp(found - 1, zone).utcoffset() != wall_offset(found, zone)
        assert gap_end or croniter.match(expression, wall, second_at_beginning=seconds)
        if timezone == "UTC":
            assert found == walls.get_next(datetime).replace(tzinfo=UTC).timestamp()
        if expression.split()[-4] == "*":  # real time: no instant in between shows a match
            step = 1 if seconds else 60
            for between in range(int(moment) // step * step + step, int(found), step):
                shown = datetime.fromtimestamp(between, zone).replace(tzinfo=None)
                assert not croniter.match(expression, shown, second_at_beginning=seconds)
        moment = found
