"""Memory of a process whose SQLite store holds many waiting jobs (run as a subprocess).

``python -m benchmarks.memory fill PATH N`` fills a store and prints its RSS as JSON;
``python -m benchmarks.memory hold PATH [--mode run|idle]`` opens a Queue with workers on it,
lets it work (``run``: the waiting jobs' task is registered) or idle (``idle``: they are all of
a task this process does not run) for a while, and prints RSS and CPU as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import anyio

import flexq
from benchmarks._common import (
    NOOP_TASK,
    cpu_seconds,
    fill,
    peak_rss_mb,
    quiet_logs,
    rss_mb,
    sqlite_url,
)
from flexq._store.sqlite import SQLiteStore


async def fill_file(path: str, count: int) -> dict[str, float]:
    """Fill a new store at ``path`` with ``count`` waiting jobs; RSS before and after."""
    before = rss_mb()
    store = SQLiteStore(path)
    await store.open()
    try:
        seconds = await fill(store, count)
    finally:
        await store.close()
    return {
        "rss_before_mb": before,
        "rss_after_fill_mb": rss_mb(),
        "peak_mb": peak_rss_mb(),
        "fill_seconds": seconds,
        "jobs": count,
    }


async def hold(path: str, mode: str, workers: int, seconds: float) -> dict[str, float]:
    """Open a Queue with ``workers`` on the filled store and let it run or idle ``seconds``."""
    before = rss_mb()
    queue = flexq.Queue(sqlite_url(path), workers=workers, max_loop_lag=None)
    ran = 0
    last = 0.0

    @queue.task(name=NOOP_TASK if mode == "run" else "bench.other")
    async def noop(i: int) -> None:
        nonlocal ran, last
        ran += 1
        last = time.perf_counter()

    started = time.perf_counter()
    async with queue:
        opened = rss_mb()
        cpu = cpu_seconds()
        wall = time.perf_counter()
        await anyio.sleep(seconds)
        cpu = cpu_seconds() - cpu
        wall = time.perf_counter() - wall
        held = rss_mb()
        counts = await queue.counts()
    return {
        "rss_before_open_mb": before,
        "rss_opened_mb": opened,
        "rss_after_mb": held,
        "peak_mb": peak_rss_mb(),
        "cpu_share": cpu / wall,
        "jobs_run": ran,
        "run_seconds": (last - started) if ran else wall,
        "waiting": counts[flexq.State.QUEUED],
        "seconds": wall,
    }


def main() -> None:
    """Command line entry: print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fill_parser = sub.add_parser("fill")
    fill_parser.add_argument("path")
    fill_parser.add_argument("count", type=int)
    hold_parser = sub.add_parser("hold")
    hold_parser.add_argument("path")
    hold_parser.add_argument("--mode", choices=["run", "idle"], default="run")
    hold_parser.add_argument("--workers", type=int, default=64)
    hold_parser.add_argument("--seconds", type=float, default=2.0)
    hold_parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    quiet_logs()
    if args.command == "fill":
        result = anyio.run(fill_file, args.path, args.count)
    else:
        result = anyio.run(
            hold, args.path, args.mode, args.workers, args.seconds, backend=args.backend
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
