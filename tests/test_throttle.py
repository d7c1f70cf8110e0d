"""The host application comes first: claiming pauses while the event loop lags."""

from __future__ import annotations

import statistics
import time

import anyio

import flexq
from tests.conftest import make_queue


async def host_tick_delays(max_loop_lag: float | None, url: str) -> tuple[list[float], int]:
    """Run CPU-bound jobs while a host task ticks every 10 ms; return its tick delays."""
    queue = make_queue(url, workers=4, max_loop_lag=max_loop_lag)

    @queue.task
    async def crunch() -> None:
        end = time.perf_counter() + 0.03
        while time.perf_counter() < end:
            pass

    delays: list[float] = []
    async with queue:
        await queue.enqueue_many([flexq.Call(crunch) for _ in range(200)])
        await anyio.sleep(0.1)
        for _ in range(30):
            before = anyio.current_time()
            await anyio.sleep(0.01)
            delays.append(anyio.current_time() - before - 0.01)
        throttle_events = queue.statistics().throttle_events
        await queue.pause()
    return delays, throttle_events


async def test_cpu_bound_jobs_yield_to_the_host_when_the_loop_lags(sqlite_url: str) -> None:
    """With a lag limit, the host's ticks are mostly on time; without one, they are late."""
    unthrottled, events_off = await host_tick_delays(None, sqlite_url)
    throttled, events_on = await host_tick_delays(0.05, sqlite_url.replace(".db", "2.db"))
    assert events_off == 0
    assert events_on >= 1
    on_time = sum(d < 0.005 for d in throttled) / len(throttled)
    on_time_off = sum(d < 0.005 for d in unthrottled) / len(unthrottled)
    p50, p50_off = statistics.median(throttled), statistics.median(unthrottled)
    print(f"on time: throttled {on_time:.0%}, unthrottled {on_time_off:.0%};"
          f" p50 {p50 * 1e3:.1f} vs {p50_off * 1e3:.1f} ms")  # fmt: skip
    # Alone on a quiet machine most throttled ticks are on time (p50 ~1 ms against ~110 ms);
    # a loaded machine narrows the gap, so the assertion asks for a clear margin only.
    assert p50 < 0.75 * p50_off
