"""The example app: three tenants enqueue jobs into an embedded SQLite queue and watch them finish.

Run it with ``python examples/app.py`` (add ``--backend trio`` to run under trio).
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
from pathlib import Path

import anyio
import structlog

import flexq

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

db_path = Path(tempfile.mkdtemp(prefix="flexq-example-")) / "flexq.db"
queue = flexq.Queue(f"sqlite:///{db_path}", workers=4)


@queue.task(retries=2, timeout=5, backoff=flexq.Backoff(base=0.05))
async def send_invoice(ctx: flexq.Context, invoice_id: int) -> str:
    """Pretend to render and send an invoice; fails now and then, and is retried."""
    await anyio.sleep(random.uniform(0.01, 0.05))
    if random.random() < 0.1:
        raise ConnectionError(f"mail server hiccup on invoice {invoice_id}")
    await ctx.enqueue(archive_invoice, invoice_id)  # a chained child job
    return f"invoice {invoice_id} sent to {ctx.tenant} (attempt {ctx.attempt})"


@queue.task(kind="future")
async def archive_invoice(invoice_id: int) -> None:
    """A fire-and-forget follow-up."""
    await anyio.sleep(0.01)


async def main() -> None:
    async with queue:
        ids = [
            await queue.enqueue(send_invoice, 1000 + n, tenant=tenant)
            for tenant, count in (("acme", 12), ("globex", 6), ("initech", 3))
            for n in range(count)
        ]
        print(f"enqueued {len(ids)} invoices for 3 tenants into {db_path}")
        for job_id in ids:
            info = await queue.wait(job_id, timeout=30)
            retried = f" after {info.attempts} attempts" if info.attempts > 1 else ""
            print(f"  {info.tenant:8} {info.state:9} {info.result}{retried}")
        await anyio.sleep(0.2)  # let the archive children finish
        for tenant in ("acme", "globex", "initech"):
            counts = await queue.counts(tenant=tenant)
            summary = ", ".join(f"{state.lower()}={n}" for state, n in counts.items() if n)
            print(f"{tenant}: {summary}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
