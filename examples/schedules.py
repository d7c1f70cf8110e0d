"""Schedules and chains: a cron schedule with seconds, and a chain of three jobs with a fan-in.

Run it with ``python examples/schedules.py`` (add ``--backend trio`` to run under trio). It
takes about seven seconds.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import anyio
import structlog

import flexq

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

db_path = Path(tempfile.mkdtemp(prefix="flexq-example-")) / "flexq.db"
queue = flexq.Queue(f"sqlite:///{db_path}", workers=4)


@queue.task
async def heartbeat(service: str) -> str:
    """What a schedule runs: here, a health check of a service."""
    return f"{service} is up"


@queue.task
async def fetch(region: str) -> int:
    """One branch of the fan-out: count a region's orders."""
    return {"eu": 120, "us": 340, "apac": 75}[region]


@queue.task
async def total(*branches: str) -> int:
    """The fan-in: runs once every branch completed, and adds their results up."""
    return sum(info.result for info in await queue.get_many(list(branches)))


@queue.task
async def report(ctx: flexq.Context) -> str:
    """A chain step: reads the result of the step before it."""
    return f"{await ctx.previous_result()} orders in all"


@queue.task
async def publish(ctx: flexq.Context) -> str:
    """The last step of the chain."""
    return f"published: {await ctx.previous_result()}"


async def main() -> None:
    async with queue:
        info = await queue.schedule("heartbeat", "*/2 * * * * *", heartbeat, "billing")
        print(f"schedule {info.name!r} ({info.cron}) fires next at {info.next_fire_time}")
        await anyio.sleep(6.5)
        await queue.pause_schedule("heartbeat")
        info = await queue.get_schedule("heartbeat")
        print(f"it fired {info.times_triggered} times; now {info.state}")
        for job in (await queue.jobs(kind="scheduled")).items:
            done = await queue.wait(job.id, timeout=10)
            print(f"  {done.run_at:%H:%M:%S} {done.state:9} {done.result}")

        # Fan out to three jobs, fan in to the first step of a chain of three.
        await queue.pause()  # hold the workers back a moment, to see the jobs wait
        branches = [await queue.enqueue(fetch, region) for region in ("eu", "us", "apac")]
        first, _, last = await queue.enqueue_chain(
            [flexq.Call(total, *branches), flexq.Call(report), flexq.Call(publish)],
            depends_on=branches,
        )
        waiting = await queue.waiting_for(first)
        print(f"{(await queue.get(first)).state}: the fan-in waits for {len(waiting)} jobs")
        await queue.resume()
        print((await queue.wait(last, timeout=10)).result)
        steps = await queue.chain(last)
        print(
            "chain:", " -> ".join(f"{job.task.rsplit('.', 1)[-1]} ({job.result})" for job in steps)
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
