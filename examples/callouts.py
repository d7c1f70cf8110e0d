"""Callouts: chains of jobs that call a web service through ``ctx.http``.

It starts a small HTTP service on 127.0.0.1 (a stand-in for the stock, payment and mail
services of a shop), then runs a chain of three callouts for each of a few orders: reserve the
stock, charge the card (the payment service fails its first request with a 503, so that step
is retried), send the receipt. Each step reads the previous step's result.

Run it with ``python examples/callouts.py`` (add ``--backend trio`` to run under trio). It
takes about a second.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

import flexq

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


class ShopService(http.server.BaseHTTPRequestHandler):
    """``POST /stock``, ``/payments`` and ``/emails``: each answers after 100 ms."""

    protocol_version = "HTTP/1.1"
    numbers = itertools.count(1)
    payments_failed = threading.Event()

    def do_POST(self) -> None:
        order = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.1)
        if self.path == "/payments" and not self.payments_failed.is_set():
            self.payments_failed.set()
            self.answer(503, {"error": "try again"})
        elif self.path == "/stock":
            self.answer(201, {"reservation": f"r-{next(self.numbers)}", **order})
        elif self.path == "/payments":
            self.answer(201, {"payment": f"p-{next(self.numbers)}", **order})
        elif self.path == "/emails":
            self.answer(202, {"receipt_to": order["email"], "payment": order["payment"]})
        else:
            self.answer(404, {"error": "no such service"})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShopService)
SHOP = f"http://127.0.0.1:{service.server_address[1]}"

db_path = Path(tempfile.mkdtemp(prefix="flexq-example-")) / "flexq.db"
queue = flexq.Queue(f"sqlite:///{db_path}", workers=2, callout_concurrency=20)


@queue.task(callout=True, retries=2, timeout=10)
async def reserve_stock(ctx: flexq.Context, order: str, email: str) -> dict[str, Any]:
    """First step: reserve the order's items."""
    response = await ctx.http.post(f"{SHOP}/stock", json={"order": order, "email": email})
    return response.json()  # type: ignore[no-any-return]


@queue.task(callout=True, retries=2, timeout=10)
async def charge_card(ctx: flexq.Context) -> dict[str, Any]:
    """Second step: charge the card for the reservation (a 503 fails the attempt: retried)."""
    reservation = await ctx.previous_result()
    response = await ctx.http.post(f"{SHOP}/payments", json=reservation)
    return response.json()  # type: ignore[no-any-return]


@queue.task(callout=True, retries=2, timeout=10)
async def send_receipt(ctx: flexq.Context) -> str:
    """Last step: mail the receipt; a 4xx would be this handler's to judge."""
    payment = await ctx.previous_result()
    response = await ctx.http.post(f"{SHOP}/emails", json=payment)
    if response.is_client_error:
        return f"no receipt for {payment['order']}: {response.status_code}"
    sent = response.json()
    return f"receipt for {payment['order']} ({sent['payment']}) sent to {sent['receipt_to']}"


async def main() -> None:
    threading.Thread(target=service.serve_forever, daemon=True).start()
    try:
        async with queue:
            chains = [
                await queue.enqueue_chain(
                    [
                        flexq.Call(reserve_stock, order, f"{tenant}@example.com"),
                        flexq.Call(charge_card),
                        flexq.Call(send_receipt),
                    ],
                    tenant=tenant,
                )
                for tenant, order in [("acme", "A-1"), ("acme", "A-2"), ("globex", "G-1")]
            ]
            for chain in chains:
                print((await queue.wait(chain[-1], timeout=30)).result)
            for step in await queue.chain(chains[0][0]):
                name = step.task.rsplit(".", 1)[-1]
                print(f"  {name:14} {step.state:9} attempts={step.attempts}"
                      f" callouts={step.callouts}")  # fmt: skip
    finally:
        service.shutdown()
        service.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
