"""The HTTPS server: threads per connection, a bounded number of them, certificates polled, graceful stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from ._admission import Injector
from ._config import InjectConfig, parse_listen
from ._exceptions import InjectError
from ._kube import KubeApi, NamespaceObjects, WebhookCaBundle, kube_api
from ._metrics import InjectorMetrics
from ._tls import CertificateSource, SelfSignedCertificate, certificate_source

log = logging.getLogger("budgetwarden.inject")

MAX_BODY_BYTES = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0  # longer than the API server's idle-connection timeout (90 s), so it always closes first
MAX_CONNECTIONS = 256
# After an answer that left the request body unread: how long, and how much, to read and drop before closing.
LINGER_S = 5.0
LINGER_MAX_BYTES = 1024 * 1024

ROUTES = {"/mutate": False, "/mutate-all": True}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], webhook: WebhookServer) -> None:
        self.webhook = webhook
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self.connections: set[Any] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN, which can stall where DNS is slow or absent.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        with contextlib.suppress(OSError):  # headers and body are separate writes: no Nagle delay between them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The context current at accept time: after a reload, new connections get the new certificate. The
        # handshake runs in the connection's thread, so a slow client never blocks the accept loop.
        try:
            tls = self.webhook.certificates.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            raise OSError("TLS wrap failed") from None
        return tls, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        log.warning("too many connections; one refused", extra={"limit": MAX_CONNECTIONS})
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.connections.discard(request)
            self._slots.release()

    def close_connections(self) -> None:
        """Ends every open connection (idle keep-alive ones would otherwise wait for their timeout)."""
        with self._lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError, TimeoutError, ConnectionError)):
            log.debug("connection ended", extra={"client": str(client_address), "error": str(exc)})
        else:
            log.error("unexpected error on a connection", exc_info=True, extra={"client": str(client_address)})


class _Counter:
    def __init__(self) -> None:
        self._value = 0
        self._cond = threading.Condition()

    def add(self, delta: int) -> None:
        with self._cond:
            self._value += delta
            self._cond.notify_all()

    def wait_zero(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._value <= 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "budgetwarden-injector"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format % args, extra={"client": self.client_address[0]})

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True  # the body (if any) was not read: the connection cannot be reused
        self._reply(status, (message + "\n").encode())
        self._drain_unread_body()

    def _drain_unread_body(self) -> None:
        """Read and drop what the client still sends until it closes (bounded in time and bytes), then close.

        Closing with unread data resets the connection: the client's write of its body fails, or the reset destroys
        the answer before the client reads it. Hence the lingering close HTTP servers do (RFC 9112, section 9.6)."""
        self.wfile.flush()
        deadline = time.monotonic() + LINGER_S
        left = LINGER_MAX_BYTES
        with contextlib.suppress(OSError):  # a timeout, a reset or a TLS error ends the wait like an end of stream
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.rfile.read1(min(left, 64 * 1024))
                if not chunk:
                    return
                left -= len(chunk)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ready = self.server.webhook.ready
            self._reply(200 if ready else 503, b"ok\n" if ready else b"not ready\n")
        elif path == "/metrics":
            metrics = self.server.webhook.metrics
            metrics.ready.set(1 if self.server.webhook.ready else 0)
            self._reply(200, metrics.exposition(), metrics.content_type)
        elif path in ROUTES:
            self._error(405, f"{path} takes POST with an AdmissionReview")
        else:
            self._error(
                404, f"no such path {path[:100]!r}: POST /mutate or /mutate-all; GET /healthz, /readyz or /metrics"
            )

    def do_POST(self) -> None:
        path = urlsplit(self.path).path  # the API server appends ?timeout=10s
        if path not in ROUTES:
            self._error(404, f"no such path {path[:100]!r}: POST /mutate or /mutate-all")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(411, "send the body with a Content-Length")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "send the body with a Content-Length")
            return
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0:
            self._error(400, f"bad Content-Length {length_text[:30]!r}")
            return
        if length > MAX_BODY_BYTES:
            self._error(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return
        webhook = self.server.webhook
        webhook.inflight.add(1)
        try:
            try:
                status, payload, content_type = webhook.injector.handle(body, ROUTES[path], path)
            except Exception:
                log.exception("admission review failed")
                webhook.metrics.admission(path, "error", 0.0)
                self._error(500, "internal error while handling the AdmissionReview (see the webhook's log)")
                return
            if not webhook.accepting:
                self.close_connection = True  # stopping: answer this one, then let the client reconnect elsewhere
            self._reply(status, payload, content_type)
        finally:
            webhook.inflight.add(-1)


class WebhookServer:
    """The webhook: HTTPS on ``config.listen``, answering from threads; certificates polled for changes."""

    def __init__(
        self, config: InjectConfig, certificates: CertificateSource | None = None, api: KubeApi | None = None
    ) -> None:
        self.config = config
        self.metrics = InjectorMetrics()
        self.api = api if api is not None else kube_api(config)
        checker = None
        if config.check_namespace_objects and self.api is not None:
            checker = NamespaceObjects(config, self.api)
        self.injector = Injector(config, checker, self.metrics)
        self.certificates = certificates if certificates is not None else certificate_source(config)
        self.ca_bundle: WebhookCaBundle | None = None
        if config.patch_webhook_ca and self.api is not None and isinstance(self.certificates, SelfSignedCertificate):
            self.ca_bundle = WebhookCaBundle(
                self.api,
                config.patch_webhook_ca,
                self.certificates.ca_bundle,
                lambda result: self.metrics.ca_bundle_syncs.labels(result=result).inc(),
            )
        self.inflight = _Counter()
        self.ready = False
        self.accepting = True
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        host, port = parse_listen(config.listen)
        try:
            self._httpd = _Server((host, port), self)
        except OSError as exc:
            raise InjectError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> WebhookServer:
        serve = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="inject-https", daemon=True
        )
        watch = threading.Thread(target=self._watch_certificates, name="inject-certs", daemon=True)
        self._threads = [serve, watch]
        if self.ca_bundle is not None:
            self._threads.append(
                threading.Thread(target=self.ca_bundle.run, args=(self._stopping,), name="inject-cabundle", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        self.ready = True
        extra: dict[str, Any] = {
            "listen": self.config.listen,
            "port": self.port,
            "sidecar": "legacy container" if self.config.legacy_sidecar else "native sidecar",
            "inject_all": self.config.inject_all,
            "sha256": getattr(self.certificates, "fingerprint", "?"),
        }
        if isinstance(self.certificates, SelfSignedCertificate):
            extra["ca_bundle"] = self.certificates.ca_bundle
            extra["dns_names"] = list(self.certificates.dns_names)
        log.info("injector serving on %s (port %d)", self.config.listen, self.port, extra=extra)
        if isinstance(self.certificates, SelfSignedCertificate) and self.ca_bundle is None:
            log.info("self-signed CA, the MutatingWebhookConfiguration's caBundle: %s", self.certificates.ca_bundle)
        return self

    def _watch_certificates(self) -> None:
        while not self._stopping.wait(self.config.cert_reload_seconds):
            try:
                self.certificates.poll()
            except Exception:
                log.exception("certificate check failed; the loaded certificate stays")

    def stop(self, delay: float = 0.0, grace: float = 10.0) -> None:
        """Not ready at once; keep serving ``delay`` seconds (endpoints to update); then stop accepting and let
        in-flight reviews finish within ``grace``."""
        self.ready = False
        if delay > 0:
            self._stopping.wait(delay)
        self._stopping.set()
        self.accepting = False
        self._httpd.shutdown()
        self._httpd.server_close()
        self.inflight.wait_zero(grace)
        self._httpd.close_connections()
        for thread in self._threads:
            thread.join(grace)
        log.info("injector stopped")


def run(config: InjectConfig) -> None:
    """Serve until SIGTERM (after --shutdown-delay-seconds) or SIGINT (at once)."""
    server = WebhookServer(config).start()
    stop = threading.Event()
    delay = {"value": 0.0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        delay["value"] = config.shutdown_delay_seconds if signum == signal.SIGTERM else 0.0
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(3600):
        pass
    log.info("stopping", extra={"delay_seconds": delay["value"]})
    server.stop(delay["value"])
