"""The Prometheus scrape endpoint (``GET /metrics``), served by aiohttp on the sidecar's own event loop.

Not the standard library's threaded WSGI server that ``prometheus_client.start_http_server`` runs: its listen backlog
is 5, so a burst of scrapes (several Prometheus replicas, an agent, a person with curl) is refused or stalls. aiohttp
accepts with a full backlog and costs no thread per connection. Rendering a scrape collects the OTel SDK's
aggregations and reads the tenant gauges from Redis with a blocking client, so it runs on a worker thread, never on
the loop the gRPC calls are answered on; concurrent scrapes share one rendering rather than each reading Redis again.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

# The kernel's accept queue for the endpoint (capped by net.core.somaxconn).
BACKLOG = 1024
# On shutdown, how long a scrape being answered may take to finish.
SHUTDOWN_GRACE_S = 2.0

Encoder = Callable[[CollectorRegistry], bytes]


class ScrapeEndpoint:
    """Serves ``registry`` in the Prometheus text or OpenMetrics format, as the scraper's Accept header asks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._runner: web.AppRunner | None = None
        self._rendering: dict[str, asyncio.Future[bytes]] = {}
        # One collection at a time: the OTel Prometheus reader hands each collection's data to one registry collect.
        self._collect_lock = threading.Lock()
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._metrics)  # prometheus_client's server answered on any path; / is the common one
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own message repeats the address
            raise OSError(f"cannot serve metrics on {host}:{port}: {reason}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await self._render(content_type, encoder)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()  # gzip when the scraper accepts it, as Prometheus does
        return response

    async def _render(self, content_type: str, encoder: Encoder) -> bytes:
        """One rendering per format in flight; scrapes that arrive meanwhile get its result."""
        pending = self._rendering.get(content_type)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._collect, encoder))
            self._rendering[content_type] = pending
            pending.add_done_callback(lambda _: self._rendering.pop(content_type, None))
        # shield: a scraper that hangs up does not cancel the rendering the others wait for.
        return await asyncio.shield(pending)

    def _collect(self, encoder: Encoder) -> bytes:
        with self._collect_lock:
            return encoder(self._registry)
