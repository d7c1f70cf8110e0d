"""Batch jobs: three tenants reindex their documents in chunks, two batches at a time each.

Run it with ``python examples/batch_reindex.py`` (add ``--backend trio`` to run under trio).
Each tenant may run two batch jobs at once; the rest wait in the tenant's holding queue, whose
order the program changes. It explains why a job waits, prints the progress of every batch
while they run, and their summaries at the end.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog

import flexq

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

db_path = Path(tempfile.mkdtemp(prefix="flexq-example-")) / "flexq.db"
queue = flexq.Queue(
    f"sqlite:///{db_path}",
    workers=6,
    backoff=flexq.Backoff(base=0.01, jitter=0.0),
    limits=flexq.Limits(max_active_batches=2),  # per tenant; the default is 5
)

BROKEN = {"acme": 333, "globex": 45}
"""A document of each of these tenants that cannot be indexed: its chunk fails every try."""


@queue.batch(scope=50, concurrency=2, retries=1)
class Reindex:
    """Reindex a collection's documents, 50 to a chunk, two chunks at a time."""

    async def start(
        self, ctx: flexq.BatchContext, collection: str, documents: int
    ) -> AsyncIterator[dict[str, str | int]]:
        # Yields the items; flexq stores them in chunks before the first execute runs.
        for n in range(documents):
            yield {"collection": collection, "doc": n}

    async def execute(self, ctx: flexq.BatchContext, chunk: list[dict[str, str | int]]) -> None:
        await anyio.sleep(0.04)  # the search engine's bulk API
        for item in chunk:
            if item["doc"] == BROKEN.get(ctx.tenant):
                raise ValueError(f"document {item['doc']} of {item['collection']} is corrupt")

    async def finish(self, ctx: flexq.BatchContext, summary: flexq.BatchSummary) -> str:
        failed = ", ".join(f"chunk {e.chunk}: {e.message}" for e in summary.errors)
        return f"{summary.items_processed} documents" + (f" ({failed})" if failed else "")


def describe(info: flexq.JobInfo, order: list[flexq.JobId]) -> str:
    """A job's state in a few characters: its place while it waits, its items while it runs."""
    progress = info.progress
    if info.state is flexq.State.HOLDING:
        # Read a moment before or after the order: the job may have been admitted since.
        return f"holding #{order.index(info.id) + 1}" if info.id in order else "admitted"
    if isinstance(progress, flexq.BatchProgress) and info.state is flexq.State.PROCESSING:
        return f"{progress.items_processed}/{progress.total_items}"
    return str(info.state).lower()


async def main() -> None:
    async with queue:
        jobs: dict[str, list[flexq.JobId]] = {}
        for tenant, collections in (
            ("acme", ["orders", "invoices", "customers", "archive", "products"]),
            ("globex", ["tickets", "contracts", "wiki"]),
            ("initech", ["reports"]),
        ):
            jobs[tenant] = [
                await queue.enqueue(Reindex, name, 150 + 50 * len(name), tenant=tenant)
                for name in collections
            ]
        print(f"enqueued {sum(map(len, jobs.values()))} batch jobs for 3 tenants into {db_path}")

        # acme's last job is urgent: it goes to the front of acme's holding queue.
        acme = jobs["acme"]
        print(f"acme's holding queue: {len(await queue.flex.order('acme'))} jobs")
        await queue.flex.move_to_front(acme[4])
        await queue.flex.move_after(acme[2], acme[3])
        print("moved 'products' to the front and 'customers' after 'archive'")
        print(await queue.limits("acme"))
        print(f"why does 'archive' wait? {await queue.explain(acme[3])}")

        started = time.perf_counter()
        everyone = [job_id for ids in jobs.values() for job_id in ids]
        while True:
            infos = await queue.get_many(everyone)
            orders = {tenant: await queue.flex.order(tenant) for tenant in jobs}
            line = "  ".join(
                f"{tenant}: "
                + ", ".join(
                    describe(info, orders[tenant]) for info in infos if info.tenant == tenant
                )
                for tenant in jobs
            )
            print(f"{time.perf_counter() - started:5.2f} s  {line}")
            if all(info.is_final for info in infos):
                break
            await anyio.sleep(0.2)

        print("summaries, in the order the jobs finished:")
        for info in sorted(infos, key=lambda info: info.finished_at or info.created_at):
            progress = info.progress
            assert isinstance(progress, flexq.BatchProgress)
            print(
                f"  {info.tenant:8} {info.args[0]:10} {info.state:9}"
                f" {progress.chunks_succeeded}/{progress.chunks_total} chunks ok: {info.result}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
