"""The HTTP client a queue shares between its jobs' callouts (``ctx.http``)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import structlog

from flexq._callouts import current_tally
from flexq._errors import CalloutFailed

log = structlog.get_logger("flexq")


class CalloutClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that counts, limits and logs each request of a running job.

    A request that times out or cannot be sent, and a response with a 5xx status, raise
    :class:`flexq.CalloutFailed`, which fails the attempt; any other response, 4xx included,
    is returned to the handler.
    """

    async def send(self, request: httpx.Request, *args: Any, **kwargs: Any) -> httpx.Response:
        """Send the request as ``httpx.AsyncClient.send`` does, as one callout of the job."""
        tally = current_tally.get()
        method, url = request.method, str(request.url)
        if tally is not None:
            tally.take(method, url)
        fields: dict[str, object] = {"method": method, "host": request.url.host}
        if tally is not None:
            fields.update(job_id=tally.job.id, tenant=tally.job.tenant, task=tally.job.task)
        started = time.perf_counter()
        try:
            response = await super().send(request, *args, **kwargs)
        except httpx.TimeoutException as exc:
            log.warning("callout timed out", duration=_since(started), error=repr(exc), **fields)
            raise CalloutFailed(method, url, None, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            log.warning("callout failed", duration=_since(started), error=repr(exc), **fields)
            raise CalloutFailed(method, url, None, f"failed: {exc!r}") from exc
        status = response.status_code
        log.info("callout", status=status, duration=_since(started), **fields)
        if status >= 500:
            await response.aclose()
            raise CalloutFailed(method, url, status, f"got {status} {response.reason_phrase}")
        return response


def open_client(*, connections: int, timeout: float) -> CalloutClient:
    """A client with a pool of up to ``connections`` connections and a per-request timeout."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return CalloutClient(limits=limits, timeout=timeout)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)
