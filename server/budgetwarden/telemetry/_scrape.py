"""The Prometheus scrape endpoint (``GET /metrics``), served by asyncio on the sidecar's own event loop.

Not the standard library's threaded WSGI server that ``prometheus_client.start_http_server`` runs: its listen backlog
is 5, so a burst of scrapes (several Prometheus replicas, an agent, a person with curl) is refused or stalls, and each
connection costs a thread. Here the kernel queues a burst (backlog 1024) and the loop accepts it at once. The protocol
is the one a scraper speaks: one GET per connection, answered and closed. Rendering collects the OTel SDK's
aggregations and reads the tenant gauges from Redis with a blocking client, so it runs on a worker thread, never on the
loop the gRPC calls are answered on; scrapes that arrive while one is rendered share its result.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import logging
import os
import threading
from collections.abc import Callable
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("budgetwarden.telemetry")

# The kernel's accept queue for the endpoint (capped by net.core.somaxconn).
BACKLOG = 1024
# A request head larger than this, or slower to arrive than READ_TIMEOUT_S, is not a scrape.
MAX_HEAD_BYTES = 16 * 1024
READ_TIMEOUT_S = 10.0
PATHS = ("/metrics", "/")

Encoder = Callable[[CollectorRegistry], bytes]


class ScrapeEndpoint:
    """Serves ``registry`` in the Prometheus text format or OpenMetrics, as the scraper's Accept header asks, gzipped
    when it accepts that."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._rendering: dict[tuple[str, bool], asyncio.Future[bytes]] = {}
        # One collection at a time: the OTel Prometheus reader hands each collection's data to one registry collect.
        self._collect_lock = threading.Lock()
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, backlog=BACKLOG, limit=MAX_HEAD_BYTES, reuse_address=True
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own message repeats the address
            raise OSError(f"cannot serve metrics on {host}:{port}: {reason}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, headers, body = await self._answer(head)
            reply = [f"HTTP/1.1 {status.value} {status.phrase}", *headers, f"Content-Length: {len(body)}"]
            writer.write(("\r\n".join([*reply, "Connection: close", "", ""])).encode("latin-1") + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a scraper that hung up or sent no request: nothing to answer
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[HTTPStatus, list[str], bytes]:
        request_line, _, rest = head.partition(b"\r\n")
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return HTTPStatus.BAD_REQUEST, [], b""
        method, target, _ = parts
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, ["Allow: GET"], b""
        if target.partition("?")[0] not in PATHS:
            return HTTPStatus.NOT_FOUND, [], b""
        headers = http.client.parse_headers(io.BytesIO(rest))
        encoder, content_type = choose_encoder(headers.get("Accept", ""))
        gzipped = "gzip" in headers.get("Accept-Encoding", "").lower()
        try:
            body = await self._render(content_type, encoder, gzipped)
        except Exception as exc:  # the scraper gets a 500 and the next scrape tries again; the sidecar goes on
            log.warning("cannot render metrics", extra={"error": repr(exc)})
            return HTTPStatus.INTERNAL_SERVER_ERROR, [], b""
        extra = ["Content-Encoding: gzip"] if gzipped else []
        return HTTPStatus.OK, [f"Content-Type: {content_type}", *extra], body

    async def _render(self, content_type: str, encoder: Encoder, gzipped: bool) -> bytes:
        """One rendering per format in flight; scrapes that arrive meanwhile get its result."""
        key = (content_type, gzipped)
        pending = self._rendering.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._collect, encoder, gzipped))
            self._rendering[key] = pending
            pending.add_done_callback(lambda _: self._rendering.pop(key, None))
        # shield: a scraper that hangs up does not cancel the rendering the others wait for.
        return await asyncio.shield(pending)

    def _collect(self, encoder: Encoder, gzipped: bool) -> bytes:
        with self._collect_lock:
            body = encoder(self._registry)
        return gzip.compress(body, compresslevel=5) if gzipped else body
