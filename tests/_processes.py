"""The harness of the process tests: real worker processes (``tests/crash_worker.py``) on one
store, a producer-only queue in the test process, and the run log they all append to.

Each child's output goes to its own file, printed when the test ends (pytest shows it for
failing tests).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import pytest

import flexq
from flexq import Call, JobInfo, State

from .crash_worker import RunLog, register_batch, register_tasks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import Process

WORKER_SCRIPT = Path(__file__).with_name("crash_worker.py")
MAX_LEASE_EXPIRIES = 3  # the Queue's default, which crash_worker.py keeps


@dataclasses.dataclass(frozen=True)
class SlotEvent:
    """A slot batch began (its ``start``) or ended (its ``finish``) in a worker process."""

    at: float
    """``time.monotonic()`` in the process, one clock for every process of the host."""
    what: Literal["begin", "end"]
    job_id: str
    pid: int


@dataclasses.dataclass(frozen=True)
class Runs:
    """What the run log says: how often each job started and finished, and in which process."""

    starts: collections.Counter[int]
    dones: collections.Counter[int]
    ready: tuple[int, ...]
    """Pids of the worker processes that came up, in order."""
    pids_by_job: dict[int, list[int]]
    """The processes that started each job."""
    chunks: collections.Counter[int]
    """How often each chunk of the crash batch ran."""
    batch_events: collections.Counter[str]
    """How often the crash batch's start and finish ran."""
    slots: tuple[SlotEvent, ...]
    """The slot batches' begins and ends, in the order they were logged."""
    enqueued: dict[int, list[tuple[float, float]]]
    """When each process began and ended enqueuing slot batches, each time it was told to
    (monotonic)."""
    ticks: collections.Counter[str]
    """How often each job of the tick task ran, by job id."""
    scheduled: dict[int, float]
    """The first fire time each process's declaration of the schedule returned (epoch)."""

    @property
    def working_pids(self) -> set[int]:
        return {pid for pids in self.pids_by_job.values() for pid in pids}


async def read_runs(path: Path) -> Runs:
    starts: collections.Counter[int] = collections.Counter()
    dones: collections.Counter[int] = collections.Counter()
    ready: list[int] = []
    pids_by_job: dict[int, list[int]] = collections.defaultdict(list)
    chunks: collections.Counter[int] = collections.Counter()
    batch_events: collections.Counter[str] = collections.Counter()
    slots: list[SlotEvent] = []
    enqueued: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    ticks: collections.Counter[str] = collections.Counter()
    scheduled: dict[int, float] = {}
    apath = anyio.Path(path)
    text = await apath.read_text() if await apath.exists() else ""
    # A line still being written (read while the workers run) is left for the next read.
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        match line.split():
            case ["ready", pid]:
                ready.append(int(pid))
            case ["start", n, pid]:
                starts[int(n)] += 1
                pids_by_job[int(n)].append(int(pid))
            case ["done", n, _]:
                dones[int(n)] += 1
            case ["chunk", n, _]:
                chunks[int(n)] += 1
            case ["batch-start" | "batch-finish" as event, _]:
                batch_events[event] += 1
            case ["slot", "begin" | "end" as what, job_id, pid, at]:
                slots.append(SlotEvent(float(at), what, job_id, int(pid)))
            case ["enqueued", pid, began, ended]:
                enqueued[int(pid)].append((float(began), float(ended)))
            case ["tick", job_id, _]:
                ticks[job_id] += 1
            case ["scheduled", pid, first]:
                scheduled[int(pid)] = float(first)
            case _:
                pytest.fail(f"torn or unknown line in the run log: {line!r}")
    return Runs(
        starts, dones, tuple(ready), dict(pids_by_job), chunks, batch_events, tuple(slots),
        dict(enqueued), ticks, scheduled,
    )  # fmt: skip


class WorkerProcesses:
    """Starts crash_worker.py children on one store URL and kills them all at the end."""

    def __init__(self, directory: Path, backend: str, url: str) -> None:
        self.url = url
        self.runs = directory / "runs.log"
        self.backend = backend
        self._directory = directory
        self._started: list[tuple[Process, Path]] = []

    async def start(self, *options: str, workers: int = 4) -> Process:
        """Start a worker; ``options`` go to crash_worker.py (``--lease``, ``--batches``...)."""
        output = self._directory / f"worker-{len(self._started)}.out"
        command = [
            sys.executable, str(WORKER_SCRIPT), self.url, str(self.runs), self.backend,
            "--workers", str(workers), *options,
        ]  # fmt: skip
        with output.open("wb") as sink:  # the child keeps its own copy of the descriptor
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._started.append((process, output))
        return process

    async def start_ready(self, *options: str, workers: int = 4) -> Process:
        """Start a worker and wait until its queue is open and working."""
        process = await self.start(*options, workers=workers)
        await self.wait_ready(process)
        return process

    async def wait_ready(self, *processes: Process, timeout: float = 15.0) -> None:
        """Wait until the workers' queues are open and working."""

        async def are_ready() -> bool:
            for process in processes:
                self.check_alive(process)
            ready = (await read_runs(self.runs)).ready
            return all(process.pid in ready for process in processes)

        pids = ", ".join(str(process.pid) for process in processes)
        await until(are_ready, timeout, f"workers {pids} to come up")

    def check_alive(self, process: Process) -> None:
        if process.returncode is not None:
            pytest.fail(f"worker {process.pid} exited with {process.returncode}: see its output")

    @staticmethod
    async def kill(process: Process) -> None:
        """SIGKILL the worker and reap it."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await process.wait()

    async def close(self) -> None:
        for process, output in self._started:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await self.kill(process)
                await process.aclose()
            text = await anyio.Path(output).read_text(errors="replace")
            print(f"--- worker {process.pid} (exit {process.returncode}), {output} ---\n{text}")


@contextlib.asynccontextmanager
async def worker_processes_on(
    url: str, directory: Path, backend: str
) -> AsyncIterator[WorkerProcesses]:
    """Worker processes on ``url`` (logging to ``directory``), killed when the block ends."""
    processes = WorkerProcesses(directory, backend, url)
    try:
        yield processes
    finally:
        await processes.close()


@contextlib.asynccontextmanager
async def producer(url: str) -> AsyncIterator[tuple[flexq.Queue, dict[str, flexq.Task[Any]]]]:
    """A queue that only enqueues and queries (no workers), with the workers' tasks registered."""
    queue = flexq.Queue(url, poll_interval=0.05)
    tasks = register_tasks(queue, RunLog(os.devnull))
    register_batch(queue, RunLog(os.devnull))
    await queue.open()
    try:
        yield queue, tasks
    finally:
        await queue.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; fail the test after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        # Another process changes what we wait for: nothing here can signal us, so poll.
        while True:
            if await check():
                return
            await anyio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def all_jobs(queue: flexq.Queue) -> dict[int, JobInfo]:
    """Every job in the store, by its first argument (the ``n`` the tests give each job)."""
    found: dict[int, JobInfo] = {}
    cursor: str | None = None
    while True:
        page = await queue.jobs(limit=1000, cursor=cursor)
        for info in page.items:
            assert info.args[0] not in found, f"two jobs with argument {info.args[0]}"
            found[info.args[0]] = info
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def all_final(queue: flexq.Queue, total: int) -> bool:
    counts = await queue.counts()
    return sum(counts[state] for state in State if state.is_final) >= total


def work_calls(task: flexq.Task[Any], count: int, *, start: int = 0) -> list[Call]:
    """``count`` jobs that each sleep 10-20 ms; job ``n`` gets the argument ``n``."""
    return [Call(task, n, 0.010 + (n % 11) / 1000) for n in range(start, start + count)]


@dataclasses.dataclass(frozen=True)
class PoisonRun:
    deaths: int
    poison: JobInfo
    others: dict[int, JobInfo]
    runs: Runs


async def run_poison(processes: WorkerProcesses, *, workers: int) -> PoisonRun:
    """Enqueue a poison pill (job 0) then 20 plain jobs, and restart every worker that dies
    until all are final."""
    others = 20
    async with producer(processes.url) as (queue, tasks):
        poison_id = await queue.enqueue(tasks["poison"], 0)
        await queue.enqueue_many(work_calls(tasks["work"], others, start=1))
        process = await processes.start(workers=workers)
        deaths = 0

        async def done_or_dead() -> bool:
            return process.returncode is not None or await all_final(queue, others + 1)

        with anyio.fail_after(30):
            while True:
                await until(done_or_dead, 20, "a worker to die or every job to be final")
                if process.returncode is None:
                    break
                assert process.returncode == -signal.SIGKILL
                deaths += 1
                assert deaths <= MAX_LEASE_EXPIRIES, "the poison ran after it should have failed"
                process = await processes.start(workers=workers)
        poison = await queue.get(poison_id)
        jobs = await all_jobs(queue)
        runs = await read_runs(processes.runs)
    del jobs[0]
    return PoisonRun(deaths, poison, jobs, runs)
