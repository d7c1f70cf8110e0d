"""Callout tasks and ctx.http, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import logging
import sqlite3
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog

import flexq
from flexq._store.base import error_record
from flexq._store.sqlite import SCHEMA_VERSION
from flexq.abc import Outcome
from tests.conftest import make_queue
from tests.test_schedules import Clock, advance_and_settle, scheduled_jobs, wait_until
from tests.test_store_conformance import OWNER, T0, claim, job, put

if TYPE_CHECKING:
    from collections.abc import Iterator, MutableMapping
    from pathlib import Path

    import httpx

    from flexq.abc import Store


class Service(http.server.ThreadingHTTPServer):
    """A small HTTP service, one thread per request, that records what it was asked.

    ``GET /wait?ms=N`` answers after N ms, ``/hang`` only when the test ends,
    ``/status/CODE`` with that status, ``/flaky/NAME?fail=N`` with 503 for the first N requests
    of NAME and 200 after.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()
        self.active = 0
        self.most_active = 0
        self.crowded = threading.Event()
        """Set once ``crowd`` requests were in progress at once."""
        self.crowd = 0
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a timeout, a cancelled job) is no error of the service."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Service

    def do_GET(self) -> None:
        service = self.server
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        _, route, *rest = url.path.split("/")
        with service.lock:
            service.hits[url.path] += 1
            hits = service.hits[url.path]
            service.active += 1
            service.most_active = max(service.most_active, service.active)
            if service.crowd and service.active >= service.crowd:
                service.crowded.set()
        try:
            status = 200
            if route == "wait":
                time.sleep(int(query["ms"]) / 1000)
            elif route == "hang":
                service.closing.wait(30)
            elif route == "status":
                status = int(rest[0])
            elif route == "flaky" and hits <= int(query["fail"]):
                status = 503
        finally:
            with service.lock:
                service.active -= 1
        body = f'{{"path": "{url.path}", "hits": {hits}}}'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[Service]:
    """The HTTP service, serving from a thread of its own for the test's duration."""
    server = Service()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def captured_info_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """flexq's log entries from INFO up (the suite shows only warnings otherwise)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def test_callout_jobs_run_beside_the_workers(queue_url: str, service: Service) -> None:
    """50 callout jobs of 200 ms each finish in well under the 5 s that 2 workers would take."""
    queue = make_queue(queue_url, workers=2)

    @queue.task(callout=True)
    async def fetch(ctx: flexq.Context, n: int) -> int:
        response = await ctx.http.get(f"{service.url}/wait", params={"ms": 200, "n": n})
        return response.status_code

    async with queue:
        started = time.perf_counter()
        ids = await queue.enqueue_many([flexq.Call(fetch, n) for n in range(50)])
        infos = [await queue.wait(job_id, timeout=10) for job_id in ids]
        elapsed = time.perf_counter() - started
    assert elapsed < 2.5
    assert {(info.state, info.result, info.callouts) for info in infos} == {
        (flexq.State.COMPLETED, 200, 1)
    }
    assert service.most_active > 2


async def test_callout_concurrency_bounds_the_callout_pool(service: Service) -> None:
    """No more than callout_concurrency callout jobs run at once."""
    queue = make_queue("memory://", workers=1, callout_concurrency=3)

    @queue.task(callout=True)
    async def fetch(ctx: flexq.Context) -> None:
        await ctx.http.get(f"{service.url}/wait", params={"ms": 50})

    async with queue:
        ids = await queue.enqueue_many([flexq.Call(fetch) for _ in range(12)])
        for job_id in ids:
            await queue.wait(job_id, timeout=10)
    assert service.most_active == 3


async def test_callout_jobs_leave_the_workers_to_other_jobs(
    queue_url: str, service: Service
) -> None:
    """While callout jobs fill their pool waiting on a service, a plain job still runs, and
    explain names the full pool (not the idle workers) as what holds the next one back."""
    queue = make_queue(queue_url, workers=8, callout_concurrency=4)

    @queue.task(callout=True)
    async def stuck(ctx: flexq.Context) -> None:
        await ctx.http.get(f"{service.url}/hang", timeout=30)

    @queue.task
    async def plain() -> str:
        return "ran"

    service.crowd = 4
    async with queue:
        for _ in range(8):
            await queue.enqueue(stuck)
        assert await anyio.to_thread.run_sync(service.crowded.wait, 10)
        info = await queue.wait(await queue.enqueue(plain), timeout=10)
        assert info.result == "ran"
        statistics = queue.statistics()
        assert (statistics.running, statistics.callouts_running) == (4, 4)
        explanation = await queue.explain(await queue.enqueue(stuck))
        assert flexq.Why.WORKERS_BUSY in {reason.why for reason in explanation.reasons}
        service.closing.set()


async def test_more_callouts_than_the_limit_fail_the_run(queue_url: str, service: Service) -> None:
    """The request past max_callouts_per_run raises LimitExceeded and is not sent."""
    queue = make_queue(queue_url, limits=flexq.Limits(max_callouts_per_run=3))
    refused: list[str] = []

    @queue.task(callout=True)
    async def chatty(ctx: flexq.Context) -> None:
        for n in range(4):
            try:
                await ctx.http.get(f"{service.url}/status/202", params={"n": n})
            except flexq.LimitExceeded as exc:
                refused.append(str(exc))
                raise

    async with queue:
        info = await queue.wait(await queue.enqueue(chatty), timeout=10)
    assert info.state is flexq.State.FAILED
    assert info.error is not None
    assert info.error.type == "flexq.LimitExceeded"
    assert "max_callouts_per_run" in refused[0]
    assert info.callouts == 3
    assert service.hits["/status/202"] == 3


async def test_the_limit_counts_each_run_afresh(service: Service) -> None:
    """Each attempt may make max_callouts_per_run requests; JobInfo.callouts adds them up."""
    queue = make_queue("memory://", limits=flexq.Limits(max_callouts_per_run=2))

    @queue.task(callout=True, retries=1)
    async def twice(ctx: flexq.Context) -> int:
        await ctx.http.get(f"{service.url}/status/200")
        await ctx.http.get(f"{service.url}/status/200")
        if ctx.attempt == 1:
            raise RuntimeError("try again")
        return ctx.callouts

    async with queue:
        info = await queue.wait(await queue.enqueue(twice), timeout=10)
    assert (info.state, info.attempts, info.result, info.callouts) == (
        flexq.State.COMPLETED, 2, 2, 4,
    )  # fmt: skip


async def test_a_callout_that_times_out_fails_the_attempt_and_retries(
    queue_url: str, service: Service
) -> None:
    """A request past callout_timeout raises CalloutFailed; the task's retries follow."""
    queue = make_queue(queue_url, callout_timeout=0.2)

    @queue.task(callout=True, retries=1)
    async def slow(ctx: flexq.Context) -> None:
        await ctx.http.get(f"{service.url}/hang")

    async with queue:
        started = time.perf_counter()
        info = await queue.wait(await queue.enqueue(slow), timeout=10)
        elapsed = time.perf_counter() - started
    assert (info.state, info.attempts, info.callouts) == (flexq.State.FAILED, 2, 2)
    assert [error.type for error in info.errors] == ["flexq.CalloutFailed"] * 2
    assert f"GET {service.url}/hang timed out" in info.errors[0].message
    assert service.hits["/hang"] == 2
    assert elapsed < 5


async def test_a_5xx_fails_the_attempt_and_the_retry_completes(
    queue_url: str, service: Service
) -> None:
    """A 5xx response raises CalloutFailed with method, url and status; the retry succeeds."""
    queue = make_queue(queue_url)
    seen: list[flexq.CalloutFailed] = []

    @queue.task(callout=True, retries=2)
    async def flaky(ctx: flexq.Context) -> Any:
        try:
            response = await ctx.http.get(f"{service.url}/flaky/a", params={"fail": 1})
        except flexq.CalloutFailed as exc:
            seen.append(exc)
            raise
        return response.json()

    async with queue:
        info = await queue.wait(await queue.enqueue(flaky), timeout=10)
    assert (info.state, info.attempts, info.callouts) == (flexq.State.COMPLETED, 2, 2)
    assert info.result == {"path": "/flaky/a", "hits": 2}
    assert info.errors[0].type == "flexq.CalloutFailed"
    assert "GET" in info.errors[0].message
    assert "503" in info.errors[0].message
    (failure,) = seen
    assert (failure.method, failure.url, failure.status) == (
        "GET", f"{service.url}/flaky/a?fail=1", 503,
    )  # fmt: skip


async def test_a_4xx_is_returned_to_the_handler(queue_url: str, service: Service) -> None:
    """A 4xx response is the handler's to judge: no error, no retry."""
    queue = make_queue(queue_url)

    @queue.task(callout=True, retries=2)
    async def lookup(ctx: flexq.Context) -> int:
        response = await ctx.http.get(f"{service.url}/status/404")
        return response.status_code

    async with queue:
        info = await queue.wait(await queue.enqueue(lookup), timeout=10)
    assert (info.state, info.result, info.attempts, info.errors) == (
        flexq.State.COMPLETED, 404, 1, (),
    )  # fmt: skip


async def test_the_job_timeout_bounds_its_callouts(service: Service) -> None:
    """A request that outlives the task's timeout is cancelled with the attempt (JobTimeout)."""
    queue = make_queue("memory://", callout_timeout=30)

    @queue.task(callout=True, timeout=0.3)
    async def slow(ctx: flexq.Context) -> None:
        await ctx.http.get(f"{service.url}/hang")

    async with queue:
        started = time.perf_counter()
        info = await queue.wait(await queue.enqueue(slow), timeout=10)
        elapsed = time.perf_counter() - started
    assert info.state is flexq.State.FAILED
    assert info.error is not None
    assert info.error.type == "flexq.JobTimeout"
    assert info.callouts == 1
    assert elapsed < 5


async def test_the_callout_pool_is_fair_between_tenants(queue_url: str, service: Service) -> None:
    """A tenant that enqueued many callout jobs first does not hold back another tenant."""
    queue = make_queue(queue_url, workers=1, callout_concurrency=1)
    order: list[str] = []

    @queue.task(callout=True)
    async def call(ctx: flexq.Context) -> None:
        order.append(ctx.tenant)
        await ctx.http.get(f"{service.url}/wait", params={"ms": 5})

    await queue.open()
    flood = await queue.enqueue_many([flexq.Call(call) for _ in range(20)], tenant="big")
    few = await queue.enqueue_many([flexq.Call(call) for _ in range(4)], tenant="small")
    await queue.close()
    async with queue:
        for job_id in few:
            await queue.wait(job_id, timeout=10)
        for job_id in flood:
            await queue.wait(job_id, timeout=10)
    assert order[:8].count("small") == 4


async def test_each_callout_is_logged(service: Service) -> None:
    """Each request is logged with method, host, status and duration, and the job's id."""
    queue = make_queue("memory://")

    @queue.task(callout=True)
    async def post(ctx: flexq.Context) -> None:
        await ctx.http.get(f"{service.url}/status/201")

    with captured_info_logs() as logs:
        async with queue:
            job_id = await queue.enqueue(post)
            await queue.wait(job_id, timeout=10)
    (entry,) = [entry for entry in logs if entry["event"] == "callout"]
    assert entry["method"] == "GET"
    assert entry["host"] == "127.0.0.1"
    assert entry["status"] == 201
    assert entry["duration"] >= 0
    assert entry["job_id"] == job_id


async def test_jobs_share_one_client_that_closes_with_the_queue(service: Service) -> None:
    """ctx.http is one pooled client per open queue, closed on close, new on the next open."""
    queue = make_queue("memory://")
    clients: list[httpx.AsyncClient] = []

    @queue.task
    async def grab(ctx: flexq.Context) -> None:
        clients.append(ctx.http)
        await ctx.http.get(f"{service.url}/status/200")

    for _ in range(2):
        async with queue:
            for job_id in [await queue.enqueue(grab), await queue.enqueue(grab)]:
                await queue.wait(job_id, timeout=10)
    first, same, second, _ = clients
    assert first is same
    assert first is not second
    assert first.is_closed
    assert second.is_closed


async def test_callout_options_are_checked() -> None:
    """callout must be a bool and callout_concurrency at least 1."""
    queue = make_queue("memory://")

    async def handler() -> None:
        pass

    with pytest.raises(flexq.InvalidArguments, match="callout"):
        queue.task(callout="yes")(handler)  # type: ignore[call-overload]
    with pytest.raises(flexq.InvalidArguments, match="callout_concurrency"):
        make_queue("memory://", callout_concurrency=0)
    with pytest.raises(flexq.InvalidArguments, match="callout_timeout"):
        make_queue("memory://", callout_timeout=0)
    with pytest.raises(flexq.InvalidArguments, match="max_callouts_per_run"):
        flexq.Limits(max_callouts_per_run=-1)


async def test_a_version_2_database_gains_the_callout_count(tmp_path: Path) -> None:
    """A SQLite file of schema version 2 is migrated: its jobs read as 0 callouts."""
    path = tmp_path / "old.db"
    queue = make_queue(f"sqlite:///{path}")

    @queue.task
    async def noop() -> None:
        pass

    await queue.open()
    job_id = await queue.enqueue(noop)
    await queue.close()
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE flexq_jobs DROP COLUMN callouts")
    old.execute("UPDATE flexq_meta SET value = '2' WHERE key = 'schema_version'")
    old.commit()
    old.close()
    async with queue:
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.callouts) == (flexq.State.COMPLETED, 0)
    migrated = sqlite3.connect(path)
    (version,) = migrated.execute("SELECT value FROM flexq_meta WHERE key = 'schema_version'")
    migrated.close()
    assert version == (str(SCHEMA_VERSION),)


async def test_stores_add_up_the_callouts_of_every_attempt(store: Store) -> None:
    """Each outcome's callouts are added to the job's, for a release and a retry too."""
    await put(store, job("a"))
    error = json.dumps(error_record("E", "", "", 1, T0))
    steps = [
        Outcome("a", flexq.State.QUEUED, release=True, callouts=2),
        Outcome("a", flexq.State.QUEUED, error=error, run_at=T0, callouts=1),
        Outcome("a", flexq.State.COMPLETED, callouts=4),
    ]
    for outcome in steps:
        assert await claim(store) == ["a"]
        assert await store.report(OWNER, [outcome], T0) == ["a"]
    info = await store.get("a")
    assert (info.state, info.callouts) == (flexq.State.COMPLETED, 7)


async def test_a_suspect_callout_job_runs_alone_in_the_callout_pool() -> None:
    """A callout job whose process died is run again alone, in the callout pool."""
    queue = make_queue("memory://")
    store = queue.store
    running = anyio.Event()
    release = anyio.Event()

    @queue.task(callout=True)
    async def call() -> None:
        running.set()
        await release.wait()

    await queue.open()
    job_id = await queue.enqueue(call)
    now = time.time()
    (claimed,) = await store.claim("a-dead-process", {"default": 1}, {call.name}, now, now - 1)
    assert claimed.id == job_id
    await queue.close()
    async with queue:
        with anyio.fail_after(10):
            await running.wait()
        statistics = queue.statistics()
        assert (statistics.running, statistics.callouts_running) == (1, 1)
        release.set()
        info = await queue.wait(job_id, timeout=10)
    assert (info.state, info.attempts) == (flexq.State.COMPLETED, 2)


async def test_a_reserved_callout_schedule_starts_while_the_callout_pool_is_full() -> None:
    """The job of a reserve=True schedule of a callout task starts on a reserved worker,
    even while the callout pool is full."""
    clock = Clock()
    queue = make_queue("memory://", workers=1, callout_concurrency=1, clock=clock)
    release = anyio.Event()

    @queue.task(callout=True)
    async def hog() -> None:
        await release.wait()

    @queue.task(callout=True, name="ping")
    async def ping() -> str:
        return "pong"

    async with queue:
        hogs = [await queue.enqueue(hog) for _ in range(2)]
        await wait_until(lambda: _callouts_running(queue, 1))
        await queue.schedule("ping", "0 * * * *", ping, reserve=True)
        await advance_and_settle(queue, clock, "ping", minutes=30)
        (job,) = await scheduled_jobs(queue)
        done = await queue.wait(job.id, timeout=10)
        counts = await queue.counts()
        release.set()
        for hog_id in hogs:
            await queue.wait(hog_id, timeout=10)
    assert (done.state, done.result) == (flexq.State.COMPLETED, "pong")
    assert (counts[flexq.State.PROCESSING], counts[flexq.State.QUEUED]) == (1, 1)


async def _callouts_running(queue: flexq.Queue, count: int) -> bool:
    await anyio.lowlevel.checkpoint()
    return queue.statistics().callouts_running == count
